//! Reads what arrives on the node's subscription back into delivery's terms: the channel
//! names a target, a durable envelope carries an inbox id, the control channel carries
//! node-to-node commands and the canary channel proves the subscription is alive.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::clock::unix_ms;
use crate::cluster::inbox::{open_envelope, Envelope};
use crate::cluster::keys::{Channel, Keys};
use crate::delivery::{Fanout, InboxEvent, Outcome, Source, Target};
use crate::health::Health;
use crate::metrics as m;

/// How far ahead of this node's clock an inbox id may be before its envelope is taken for
/// a forgery: ids are Redis-clock milliseconds, and clocks of a deployment agree far
/// better than this. A forged id far in the future would otherwise make the session drop
/// every real durable message below it as a duplicate.
const MAX_ID_AHEAD_MS: u64 = 60_000;

/// Control messages nodes exchange on `<prefix>:ctl`.
#[derive(Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(crate) enum ControlMessage {
    /// Close every session of `user` with 4002.
    Disconnect { user: String },
}

/// What became of one received payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Routed {
    /// Handed to the fan-out.
    Delivered(Outcome),
    /// Not a channel of this deployment (or another node's canary): dropped and counted.
    UnknownChannel,
    /// A control message, carried out.
    Control,
    /// A control message herald does not understand: dropped and counted.
    BadControl,
    /// This node's canary came back.
    Canary,
    /// An inbox event (read, retract) told to the user's sessions.
    InboxEvent,
    /// A durable envelope whose id lies in the future: dropped and counted.
    BadEnvelope,
}

/// Routes payloads received on the node's subscription.
pub(crate) struct Router {
    keys: Keys,
    fanout: Arc<Fanout>,
    health: Arc<Health>,
}

impl Router {
    pub(crate) fn new(keys: Keys, fanout: Arc<Fanout>, health: Arc<Health>) -> Self {
        Router {
            keys,
            fanout,
            health,
        }
    }

    pub(crate) fn keys(&self) -> &Keys {
        &self.keys
    }

    pub(crate) fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Parks every local session's live deliveries for a catch-up (see
    /// [`Fanout::hold_all_for_catch_up`]).
    pub(crate) fn hold_all_for_catch_up(&self) -> usize {
        self.fanout.hold_all_for_catch_up()
    }

    /// Parks the live deliveries of the sessions that `channel` feeds and that a catch-up
    /// can serve: a user channel's sessions (only user messages are durable, so a topic,
    /// broadcast or control channel has nothing to catch up). Returns how many sessions
    /// wait for a catch-up.
    pub(crate) fn hold_channel_for_catch_up(&self, channel: &str) -> usize {
        match self.keys.parse_channel(channel) {
            Some(Channel::User(user)) => self.fanout.hold_user_for_catch_up(user),
            _ => 0,
        }
    }

    /// Routes one payload received on `channel`. Returns once it is written to every local
    /// recipient (see [`Fanout::handle_spread`]), so the next one keeps each session's order.
    pub(crate) async fn route(&self, channel: &str, payload: &[u8]) -> Routed {
        let Some(ch) = self.keys.parse_channel(channel) else {
            metrics::counter!(m::MESSAGES_DROPPED, "reason" => "unknown_channel").increment(1);
            return Routed::UnknownChannel;
        };
        let (target, durable, payload) = match ch {
            Channel::Control => return self.control(payload),
            Channel::Canary => {
                self.health.canary_received(payload);
                return Routed::Canary;
            }
            // Durable messages and inbox events arrive enveloped (see inbox::Envelope).
            Channel::User(u) => match open_envelope(payload) {
                None => (Target::User(u), None, payload),
                Some(env) if env.id().ms > unix_ms().saturating_add(MAX_ID_AHEAD_MS) => {
                    metrics::counter!(m::MESSAGES_DROPPED, "reason" => "bad_envelope").increment(1);
                    tracing::warn!(channel, id = %env.id(), "dropped an envelope with an id in the future");
                    return Routed::BadEnvelope;
                }
                Some(Envelope::Message { durable, payload }) => {
                    (Target::User(u), Some(durable), payload)
                }
                Some(Envelope::Read { id, session }) => {
                    self.fanout.inbox_event(u, InboxEvent::Read(id), session);
                    return Routed::InboxEvent;
                }
                Some(Envelope::Retract { id }) => {
                    self.fanout.inbox_event(u, InboxEvent::Retract(id), None);
                    return Routed::InboxEvent;
                }
            },
            Channel::Topic(t) => (Target::Topic(t), None, payload),
            Channel::Broadcast => (Target::Broadcast, None, payload),
        };
        Routed::Delivered(
            self.fanout
                .handle_spread(target, durable, payload, Source::Redis)
                .await,
        )
    }

    fn control(&self, payload: &[u8]) -> Routed {
        match serde_json::from_slice::<ControlMessage>(payload) {
            Ok(ControlMessage::Disconnect { user }) => {
                self.fanout.kick(&user);
                Routed::Control
            }
            Err(e) => {
                metrics::counter!(m::MESSAGES_DROPPED, "reason" => "bad_control").increment(1);
                tracing::warn!(error = %e, "ignored malformed control message");
                Routed::BadControl
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::inbox::envelope;
    use crate::protocol::{CloseReason, StreamId};
    use crate::transport::Client;

    fn setup() -> (Router, Arc<Client>) {
        let (fanout, client) = crate::delivery::testing::fanout_with_one_session(16);
        let health = Arc::new(Health::new(false));
        (Router::new(Keys::new("p", "n1"), fanout, health), client)
    }

    #[tokio::test]
    async fn channels_name_their_targets() {
        let (r, client) = setup();
        let one = Routed::Delivered(Outcome::Delivered { queued: 1 });
        assert_eq!(r.route("p:user:{42}", b"1").await, one);
        assert_eq!(r.route("p:topic:{t}", b"2").await, one);
        assert_eq!(r.route("p:broadcast", b"3").await, one);
        let none = Routed::Delivered(Outcome::Delivered { queued: 0 });
        assert_eq!(r.route("p:user:{7}", b"4").await, none);
        let labels: Vec<String> = client
            .take(8)
            .iter()
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect();
        assert_eq!(
            labels,
            vec![
                r#"{"type":"message","channel":"user:42","data":1}"#,
                r#"{"type":"message","channel":"topic:t","data":2}"#,
                r#"{"type":"message","channel":"broadcast","data":3}"#,
            ]
        );
    }

    #[tokio::test]
    async fn enveloped_payloads_carry_their_inbox_id() {
        let (r, client) = setup();
        let id = StreamId { ms: 9, seq: 1 };
        let raw = envelope("9-1", b"{\"x\":2}");
        assert_eq!(
            r.route("p:user:{42}", &raw).await,
            Routed::Delivered(Outcome::Delivered { queued: 1 })
        );
        let got = client.take(1).remove(0);
        assert_eq!(got.id, Some(id));
        assert_eq!(
            std::str::from_utf8(&got.payload).unwrap_or_default(),
            r#"{"type":"message","channel":"user:42","id":"9-1","data":{"x":2}}"#
        );
    }

    #[tokio::test]
    async fn foreign_and_oversize_payloads_are_dropped() {
        let (r, client) = setup();
        assert_eq!(
            r.route("p:user:{42}", &[b'x'; 17]).await,
            Routed::Delivered(Outcome::Oversize)
        );
        assert_eq!(r.route("q:user:{42}", b"1").await, Routed::UnknownChannel);
        assert_eq!(
            r.route("p:node:n2:canary", b"1").await,
            Routed::UnknownChannel
        );
        assert_eq!(client.queued(), 0);
    }

    #[tokio::test]
    async fn control_disconnect_kicks_the_user() {
        let (r, client) = setup();
        assert_eq!(
            r.route("p:ctl", b"{\"op\":\"nope\"}").await,
            Routed::BadControl
        );
        assert!(!client.is_closed());
        assert_eq!(
            r.route("p:ctl", br#"{"op":"disconnect","user":"42"}"#)
                .await,
            Routed::Control
        );
        assert_eq!(client.reason(), Some(CloseReason::Kicked));
    }

    #[tokio::test]
    async fn inbox_events_reach_the_users_other_sessions_and_future_ids_are_refused() {
        let (r, client) = setup();
        assert_eq!(
            r.route("p:user:{42}", &envelope("read 9-1", b"")).await,
            Routed::InboxEvent
        );
        assert_eq!(
            r.route("p:user:{42}", &envelope("retract 9-1", b"")).await,
            Routed::InboxEvent
        );
        let frames: Vec<String> = client
            .take(8)
            .iter()
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect();
        assert_eq!(
            frames,
            vec![
                r#"{"type":"read","id":"9-1"}"#,
                r#"{"type":"retract","id":"9-1"}"#
            ]
        );
        let future = format!("{}-0", unix_ms() + 3_600_000);
        assert_eq!(
            r.route("p:user:{42}", &envelope(&future, b"1")).await,
            Routed::BadEnvelope
        );
        assert_eq!(client.queued(), 0);
    }

    #[tokio::test]
    async fn the_canary_reaches_health() {
        let (r, _client) = setup();
        r.health().canary_sending(1);
        assert!(!r.health().canary_answered());
        assert_eq!(r.route("p:node:n1:canary", b"1").await, Routed::Canary);
        assert!(r.health().canary_answered());
    }
}
