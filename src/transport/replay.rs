//! The start of a session's stream: the welcome, then the durable inbox replayed after
//! `since` (or after the user's read cursor), in pages, with `gap` frames where entries
//! were lost. Runs while the session is held, after its subscriptions are confirmed, so the
//! live copies of replayed entries can be dropped by id without a hole in between.
//!
//! The inbox is reached through the [`InboxPort`] the node hands in; transport knows
//! nothing of Redis.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::client::Client;
use super::outbox::Outgoing;
use crate::metrics as m;
use crate::protocol::{message_frame, CloseReason, InboxEntry, ServerFrame, StreamId};

/// A boxed future, as a dyn-compatible trait returns it.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why the inbox could not answer (only logged and counted: the session goes on with live
/// messages).
pub(crate) type PortError = Box<dyn std::error::Error + Send + Sync>;

/// What a session needs of the durable inbox: replay reads and acknowledgements.
pub(crate) trait InboxPort: Send + Sync {
    /// The user's read cursor: the last id they acknowledged.
    fn cursor<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<Option<StreamId>, PortError>>;
    /// True when entries newer than `since` were dropped by the inbox caps.
    fn trimmed_after<'a>(
        &'a self,
        user: &'a str,
        since: StreamId,
    ) -> BoxFuture<'a, Result<bool, PortError>>;
    /// Up to `count` entries after `after` (from the start when `None`), oldest first.
    fn read_after<'a>(
        &'a self,
        user: &'a str,
        after: Option<StreamId>,
        count: usize,
    ) -> BoxFuture<'a, Result<Vec<InboxEntry>, PortError>>;
    /// Moves the user's read cursor forward to `id`.
    fn ack<'a>(&'a self, user: &'a str, id: StreamId) -> BoxFuture<'a, Result<bool, PortError>>;
}

/// Entries read from the inbox per round trip while replaying: bounds node memory per
/// replaying session to this many payloads.
pub(crate) const REPLAY_PAGE: usize = 16;

/// Limits of one replay.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReplayLimits {
    /// Most entries replayed to one connection (`--replay-limit`).
    pub(crate) max_entries: usize,
    /// Larger entries are skipped and counted (`--max-message-bytes`).
    pub(crate) max_bytes: usize,
    /// A frame the client does not take within this time ends it as slow (`--write-timeout`).
    pub(crate) write_timeout: Duration,
}

/// Sends the welcome, then replays the durable inbox after `since` (or after the user's
/// read cursor) in pages, with a gap frame when entries were lost. Returns the id of the
/// last replayed entry, so the caller can release the session dropping live copies of it
/// and everything before.
pub(crate) async fn greet(
    client: &Client,
    inbox: &dyn InboxPort,
    welcome: String,
    user: &str,
    since: Option<StreamId>,
    limits: ReplayLimits,
) -> Result<Option<StreamId>, CloseReason> {
    let wt = limits.write_timeout;
    send_text(client, welcome, wt).await?;
    let start = match since {
        Some(s) => Some(s),
        None => match inbox.cursor(user).await {
            Ok(c) => c,
            Err(e) => {
                replay_failed(&*e);
                return Ok(None);
            }
        },
    };
    if let Some(start) = start {
        match inbox.trimmed_after(user, start).await {
            Ok(true) => {
                send_text(client, ServerFrame::Gap { reason: "trimmed" }.to_text(), wt).await?;
            }
            Ok(false) => {}
            Err(e) => {
                replay_failed(&*e);
                return Ok(None);
            }
        }
    }
    let label = format!("user:{user}");
    let limit = limits.max_entries;
    let mut after = start;
    let mut replayed = None;
    let mut sent = 0usize;
    while sent < limit {
        let page = match inbox
            .read_after(user, after, REPLAY_PAGE.min(limit - sent))
            .await
        {
            Ok(p) => p,
            Err(e) => {
                replay_failed(&*e);
                break;
            }
        };
        if page.is_empty() {
            break;
        }
        for entry in page {
            after = Some(entry.id);
            replayed = Some(entry.id);
            sent += 1;
            if entry.data.len() > limits.max_bytes {
                metrics::counter!(m::MESSAGES_DROPPED, "reason" => "oversize").increment(1);
                continue;
            }
            let frame = message_frame(&label, Some(&entry.id.to_string()), &entry.data);
            send_text(client, frame, wt).await?;
            metrics::counter!(m::MESSAGES_REPLAYED).increment(1);
        }
    }
    if sent >= limit
        && matches!(inbox.read_after(user, after, 1).await, Ok(more) if !more.is_empty())
    {
        send_text(
            client,
            ServerFrame::Gap {
                reason: "replay_limit",
            }
            .to_text(),
            wt,
        )
        .await?;
    }
    Ok(replayed)
}

fn replay_failed(e: &(dyn std::error::Error + Send + Sync)) {
    tracing::warn!(error = %e, "inbox replay failed; continuing with live messages");
    metrics::counter!(m::REDIS_ERRORS, "op" => "inbox_replay").increment(1);
}

/// Writes one text frame of the welcome or replay (the session is held: nothing else
/// writes). A client that does not take it within `wait` is a slow consumer.
async fn send_text(client: &Client, text: String, wait: Duration) -> Result<(), CloseReason> {
    client.send_now(&Outgoing::text(text, None), wait).await
}
