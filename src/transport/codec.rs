//! WebSocket framing for the server side of a session: the header of every frame herald
//! writes, and an incremental reader of client frames that keeps no buffer while a
//! connection is idle. Header parsing is tungstenite's; what is ours is the connection
//! state, so that an idle session holds no read buffer and no per-connection codec.

use std::io::Cursor;

use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

use crate::protocol::CloseReason;

/// Why the client's byte stream is not acceptable WebSocket (RFC 6455 section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CodecError {
    /// Unmasked frame, reserved bits or opcodes, a bad control frame, a stray continuation.
    #[error("WebSocket protocol violation")]
    Protocol,
    /// A text message or close reason that is not UTF-8.
    #[error("text is not valid UTF-8")]
    InvalidUtf8,
    /// A frame or reassembled message above the size limit (refused from its header).
    #[error("message too big")]
    TooBig,
}

impl From<CodecError> for CloseReason {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::Protocol => CloseReason::Protocol,
            CodecError::InvalidUtf8 => CloseReason::InvalidUtf8,
            CodecError::TooBig => CloseReason::TooBig,
        }
    }
}

/// Largest header herald writes: 2 bytes, 8 of extended length, no mask (servers do not
/// mask).
pub(crate) const MAX_HEADER: usize = 10;

/// Kinds of frames herald writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Text,
    Ping,
    Pong,
    Close,
}

/// The header of an unmasked, final frame of `kind` carrying `len` payload bytes.
pub(crate) fn header(kind: Kind, len: usize) -> ([u8; MAX_HEADER], usize) {
    let opcode: u8 = match kind {
        Kind::Text => 0x1,
        Kind::Close => 0x8,
        Kind::Ping => 0x9,
        Kind::Pong => 0xA,
    };
    let mut h = [0u8; MAX_HEADER];
    h[0] = 0x80 | opcode;
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if len <= u16::MAX as usize {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

/// The payload of a close frame: the code, then the reason text.
pub(crate) fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(2 + reason.len());
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(reason.as_bytes());
    p
}

/// What a client sent, one complete frame or message at a time.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming<'a> {
    /// A complete text message (reassembled if it was fragmented), valid UTF-8.
    Text(&'a str),
    /// A complete binary message; herald speaks text only.
    Binary,
    /// A ping; the pong must carry this payload.
    Ping(&'a [u8]),
    Pong,
    /// A close frame with its code (`None` when the frame carried none).
    Close(Option<u16>),
}

/// Reads client frames from the bytes of successive socket reads. It owns memory only
/// while a frame or a fragmented message is incomplete, which for a notification client
/// (pongs, pings, acks of a few dozen bytes) is almost never between reads.
#[derive(Debug, Default)]
pub(crate) struct FrameReader {
    /// Bytes of a frame not yet complete.
    partial: Vec<u8>,
    /// A fragmented message being reassembled: its opcode is text (true) or binary.
    fragments: Option<(bool, Vec<u8>)>,
}

impl FrameReader {
    /// Bytes of an incomplete frame (or frames left unread when `on` stopped) are held.
    pub(crate) fn has_partial(&self) -> bool {
        !self.partial.is_empty()
    }

    /// A reader that starts with bytes already received (read past the HTTP upgrade).
    pub(crate) fn with_bytes(bytes: &[u8]) -> Self {
        FrameReader {
            partial: bytes.to_vec(),
            fragments: None,
        }
    }

    /// Feeds the bytes of one read. Calls `on` for every complete frame or message, stops
    /// at the first error or when `on` returns `false`, and keeps an incomplete tail for the
    /// next call. Frames and messages above `max` bytes are refused before they are
    /// buffered.
    pub(crate) fn feed<F>(&mut self, data: &[u8], max: usize, mut on: F) -> Result<(), CodecError>
    where
        F: FnMut(Incoming<'_>) -> bool,
    {
        if self.partial.is_empty() {
            let used = Self::parse(&mut self.fragments, data, max, &mut on)?;
            if used < data.len() {
                self.partial.extend_from_slice(&data[used..]);
            }
        } else {
            self.partial.extend_from_slice(data);
            let mut buf = std::mem::take(&mut self.partial);
            let used = Self::parse(&mut self.fragments, &buf, max, &mut on)?;
            buf.drain(..used);
            if buf.is_empty() {
                // Release the memory: idle sessions should hold none.
                buf = Vec::new();
            }
            self.partial = buf;
        }
        Ok(())
    }

    /// Parses as many complete frames from `data` as there are; returns the bytes used.
    /// `data` is unmasked in place (a scratch or partial buffer the caller owns).
    fn parse<F>(
        fragments: &mut Option<(bool, Vec<u8>)>,
        data: &[u8],
        max: usize,
        on: &mut F,
    ) -> Result<usize, CodecError>
    where
        F: FnMut(Incoming<'_>) -> bool,
    {
        let mut pos = 0usize;
        while pos < data.len() {
            let mut cur = Cursor::new(&data[pos..]);
            let (h, len) = match FrameHeader::parse(&mut cur) {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(_) => return Err(CodecError::Protocol),
            };
            if h.rsv1 || h.rsv2 || h.rsv3 {
                return Err(CodecError::Protocol);
            }
            // RFC 6455 5.1: a server must close on an unmasked client frame.
            let Some(mask) = h.mask else {
                return Err(CodecError::Protocol);
            };
            let is_control = matches!(h.opcode, OpCode::Control(_));
            if is_control && (len > 125 || !h.is_final) {
                return Err(CodecError::Protocol);
            }
            if len > max as u64 {
                return Err(CodecError::TooBig);
            }
            let head = cur.position() as usize;
            let total = head + len as usize;
            if data.len() - pos < total {
                break;
            }
            let mut payload = data[pos + head..pos + total].to_vec();
            unmask(&mut payload, mask);
            pos += total;
            let go_on = match h.opcode {
                OpCode::Control(Control::Ping) => on(Incoming::Ping(&payload)),
                OpCode::Control(Control::Pong) => on(Incoming::Pong),
                OpCode::Control(Control::Close) => {
                    let code = match payload.len() {
                        0 => None,
                        1 => return Err(CodecError::Protocol),
                        _ => {
                            if std::str::from_utf8(&payload[2..]).is_err() {
                                return Err(CodecError::InvalidUtf8);
                            }
                            Some(u16::from_be_bytes([payload[0], payload[1]]))
                        }
                    };
                    on(Incoming::Close(code))
                }
                OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                    return Err(CodecError::Protocol)
                }
                OpCode::Data(Data::Continue) => {
                    let Some((text, buf)) = fragments.as_mut() else {
                        return Err(CodecError::Protocol);
                    };
                    if buf.len() + payload.len() > max {
                        return Err(CodecError::TooBig);
                    }
                    buf.extend_from_slice(&payload);
                    if h.is_final {
                        let (text, buf) = (*text, std::mem::take(buf));
                        *fragments = None;
                        complete(text, &buf, on)?
                    } else {
                        true
                    }
                }
                OpCode::Data(d) => {
                    if fragments.is_some() {
                        return Err(CodecError::Protocol);
                    }
                    let text = matches!(d, Data::Text);
                    if h.is_final {
                        complete(text, &payload, on)?
                    } else {
                        *fragments = Some((text, payload));
                        true
                    }
                }
            };
            if !go_on {
                break;
            }
        }
        Ok(pos)
    }
}

fn complete<F>(text: bool, payload: &[u8], on: &mut F) -> Result<bool, CodecError>
where
    F: FnMut(Incoming<'_>) -> bool,
{
    if !text {
        return Ok(on(Incoming::Binary));
    }
    match std::str::from_utf8(payload) {
        Ok(s) => Ok(on(Incoming::Text(s))),
        Err(_) => Err(CodecError::InvalidUtf8),
    }
}

fn unmask(buf: &mut [u8], mask: [u8; 4]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A masked client frame.
    fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut f = vec![opcode | if fin { 0x80 } else { 0 }];
        let len = payload.len();
        if len < 126 {
            f.push(0x80 | len as u8);
        } else if len <= 0xFFFF {
            f.push(0x80 | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(len as u64).to_be_bytes());
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        f
    }

    #[derive(Debug, PartialEq)]
    enum Got {
        Text(String),
        Binary,
        Ping(Vec<u8>),
        Pong,
        Close(Option<u16>),
    }

    fn read_all(chunks: &[&[u8]], max: usize) -> (Vec<Got>, Result<(), CodecError>, usize) {
        let mut r = FrameReader::default();
        let mut got = Vec::new();
        let mut result = Ok(());
        for c in chunks {
            result = r.feed(c, max, |i| {
                got.push(match i {
                    Incoming::Text(s) => Got::Text(s.to_string()),
                    Incoming::Binary => Got::Binary,
                    Incoming::Ping(p) => Got::Ping(p.to_vec()),
                    Incoming::Pong => Got::Pong,
                    Incoming::Close(c) => Got::Close(c),
                });
                true
            });
            if result.is_err() {
                break;
            }
        }
        (got, result, r.partial.capacity())
    }

    #[test]
    fn headers_use_the_shortest_length_form() {
        assert_eq!(&header(Kind::Text, 5).0[..2], &[0x81, 5]);
        assert_eq!(header(Kind::Text, 125).1, 2);
        let (h, n) = header(Kind::Text, 126);
        assert_eq!((&h[..n], n), (&[0x81, 126, 0, 126][..], 4));
        let (h, n) = header(Kind::Close, 70_000);
        assert_eq!(n, 10);
        assert_eq!(h[0], 0x88);
        assert_eq!(
            u64::from_be_bytes(h[2..10].try_into().unwrap_or_default()),
            70_000
        );
        assert_eq!(header(Kind::Ping, 0).0[0], 0x89);
        assert_eq!(header(Kind::Pong, 0).0[0], 0x8A);
    }

    #[test]
    fn reads_frames_split_anywhere_and_frees_the_tail() {
        let mut stream = client_frame(0x1, true, b"{\"type\":\"ping\"}");
        stream.extend(client_frame(0x9, true, b"hi"));
        stream.extend(client_frame(0xA, true, b""));
        stream.extend(client_frame(0x8, true, &close_payload(1000, "bye")));
        for cut in 0..stream.len() {
            let (got, res, cap) = read_all(&[&stream[..cut], &stream[cut..]], 1024);
            assert_eq!(res, Ok(()));
            assert_eq!(
                got,
                vec![
                    Got::Text("{\"type\":\"ping\"}".into()),
                    Got::Ping(b"hi".to_vec()),
                    Got::Pong,
                    Got::Close(Some(1000)),
                ],
                "cut at {cut}"
            );
            assert_eq!(cap, 0, "no buffer kept once every frame is complete");
        }
    }

    #[test]
    fn reassembles_fragments_with_interleaved_control_frames() {
        let mut s = client_frame(0x1, false, b"hel");
        s.extend(client_frame(0x9, true, b"p"));
        s.extend(client_frame(0x0, false, b"lo "));
        s.extend(client_frame(0x0, true, "wörld".as_bytes()));
        let (got, res, _) = read_all(&[&s], 1024);
        assert_eq!(res, Ok(()));
        assert_eq!(
            got,
            vec![Got::Ping(b"p".to_vec()), Got::Text("hello wörld".into())]
        );
    }

    #[test]
    fn refuses_what_the_rfc_forbids() {
        let cases: Vec<(Vec<u8>, CodecError)> = vec![
            // Unmasked client frame.
            (vec![0x81, 0x01, b'a'], CodecError::Protocol),
            // RSV1 without an extension.
            (
                {
                    let mut f = client_frame(0x1, true, b"a");
                    f[0] |= 0x40;
                    f
                },
                CodecError::Protocol,
            ),
            // Reserved opcode.
            (client_frame(0x3, true, b""), CodecError::Protocol),
            // Fragmented control frame.
            (client_frame(0x9, false, b""), CodecError::Protocol),
            // Control frame over 125 bytes.
            (client_frame(0x9, true, &[0u8; 126]), CodecError::Protocol),
            // Continuation without a start.
            (client_frame(0x0, true, b"x"), CodecError::Protocol),
            // A new message while one is fragmented.
            (
                {
                    let mut f = client_frame(0x1, false, b"a");
                    f.extend(client_frame(0x1, true, b"b"));
                    f
                },
                CodecError::Protocol,
            ),
            // Close with a one-byte payload.
            (client_frame(0x8, true, b"x"), CodecError::Protocol),
            // Invalid UTF-8, whole and across fragments.
            (client_frame(0x1, true, &[0xC3]), CodecError::InvalidUtf8),
            (
                {
                    let mut f = client_frame(0x1, false, &[0xC3]);
                    f.extend(client_frame(0x0, true, &[0x28]));
                    f
                },
                CodecError::InvalidUtf8,
            ),
            // Too big, as one frame and as fragments.
            (client_frame(0x1, true, &[b'a'; 65]), CodecError::TooBig),
            (
                {
                    let mut f = client_frame(0x1, false, &[b'a'; 40]);
                    f.extend(client_frame(0x0, true, &[b'a'; 40]));
                    f
                },
                CodecError::TooBig,
            ),
        ];
        for (bytes, want) in cases {
            let (_, res, _) = read_all(&[&bytes], 64);
            assert_eq!(res, Err(want), "{bytes:02x?}");
        }
    }

    #[test]
    fn a_huge_declared_length_is_refused_from_the_header_alone() {
        // 2^62 bytes declared; only the header arrives. Nothing may be allocated for it.
        let mut f = vec![0x81, 0x80 | 127];
        f.extend_from_slice(&(1u64 << 62).to_be_bytes());
        f.extend_from_slice(&[1, 2, 3, 4]);
        let (_, res, cap) = read_all(&[&f], 1 << 20);
        assert_eq!(res, Err(CodecError::TooBig));
        assert_eq!(cap, 0);
    }

    #[test]
    fn binary_messages_are_reported() {
        let (got, res, _) = read_all(&[&client_frame(0x2, true, b"\x00\x01")], 64);
        assert_eq!((got, res), (vec![Got::Binary], Ok(())));
    }

    #[test]
    fn stops_when_told_and_keeps_the_rest() {
        let mut s = client_frame(0x1, true, b"a");
        s.extend(client_frame(0x1, true, b"b"));
        let mut r = FrameReader::default();
        let mut n = 0;
        assert_eq!(
            r.feed(&s, 64, |_| {
                n += 1;
                false
            }),
            Ok(())
        );
        assert_eq!(n, 1);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
            let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
            let _ = read_all(&refs, 32);
        }

        #[test]
        fn any_text_round_trips_in_any_chunking(text in "\\PC{0,200}", cut in 0usize..300) {
            let f = client_frame(0x1, true, text.as_bytes());
            let cut = cut.min(f.len());
            let (got, res, cap) = read_all(&[&f[..cut], &f[cut..]], 1024);
            prop_assert_eq!(res, Ok(()));
            prop_assert_eq!(got, vec![Got::Text(text)]);
            prop_assert_eq!(cap, 0);
        }
    }
}
