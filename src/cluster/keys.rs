//! Every Redis key and pub/sub channel name, built from the configured prefix, and channel
//! names read back into what they carry. Rust code formats keys only here; the Lua scripts
//! that must find keys by id (the reaper, stats, `herald_notify`) derive them from a prefix
//! this module passes in, and docs/redis.md lists them all.

use crate::delivery::{Interest, Target};

/// What a publication's channel says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Channel<'a> {
    /// `<prefix>:user:{<uid>}`: every session of one user (may carry a durable envelope).
    User(&'a str),
    /// `<prefix>:broadcast`: every session.
    Broadcast,
    /// `<prefix>:topic:{<name>}`: sessions that joined the topic.
    Topic(&'a str),
    /// `<prefix>:ctl`: node-to-node control messages (disconnect a user).
    Control,
    /// `<prefix>:node:<id>:canary`: this node's private liveness probe.
    Canary,
}

/// Key and channel builder bound to one prefix and node.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
    node: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str, node_id: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
            node: node_id.to_string(),
        }
    }

    /// Channel carrying notifications for one user.
    pub(crate) fn user_channel(&self, user: &str) -> String {
        format!("{}:user:{{{}}}", self.prefix, user)
    }

    /// Channel carrying notifications for every session.
    pub(crate) fn broadcast_channel(&self) -> String {
        format!("{}:broadcast", self.prefix)
    }

    /// Channel carrying notifications for a topic.
    pub(crate) fn topic_channel(&self, topic: &str) -> String {
        format!("{}:topic:{{{}}}", self.prefix, topic)
    }

    /// The channel a publication for `target` goes to.
    pub(crate) fn target_channel(&self, target: Target<'_>) -> String {
        match target {
            Target::User(u) => self.user_channel(u),
            Target::Topic(t) => self.topic_channel(t),
            Target::Broadcast => self.broadcast_channel(),
        }
    }

    /// The channel a node subscribes to for `interest`.
    pub(crate) fn interest_channel(&self, interest: &Interest) -> String {
        match interest {
            Interest::User(u) => self.user_channel(u),
            Interest::Topic(t) => self.topic_channel(t),
        }
    }

    /// Channel every node subscribes to for control messages.
    pub(crate) fn control_channel(&self) -> String {
        format!("{}:ctl", self.prefix)
    }

    /// This node's private canary channel.
    pub(crate) fn canary_channel(&self) -> String {
        format!("{}:node:{}:canary", self.prefix, self.node)
    }

    /// HASH of one user's sessions across the cluster: field `<session>` ->
    /// `<lease>|<connected_at ms>`, and field `=` with the user's online state (see
    /// lua/presence_prelude.lua). Refreshed by a slice of every heartbeat, not all of it.
    pub(crate) fn presence_key(&self, user: &str) -> String {
        format!("{}:presence:{{{}}}", self.prefix, user)
    }

    /// ZSET registry of node leases: member lease id, score = expiry (Redis ms).
    pub(crate) fn registry_key(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    /// ZSET of users whose last event was `online` (member user id, score = its time): the
    /// count of distinct online users. Written with the events, so it carries the events
    /// stream's name as its hash tag (`<prefix>:online:{<prefix>:events}`): same slot.
    pub(crate) fn online_key(&self) -> String {
        format!("{}:online:{{{}:events}}", self.prefix, self.prefix)
    }

    /// HASH describing a lease (node, connections, users, started_at, listen); it lives
    /// `--presence-ttl` after the lease's last heartbeat: its existence is the lease.
    pub(crate) fn lease_key(&self, lease: &str) -> String {
        format!("{}:lease:{{{}}}", self.prefix, lease)
    }

    /// SET of the users a lease holds sessions of (what a reaper visits when it dies).
    pub(crate) fn lease_users_key(&self, lease: &str) -> String {
        format!("{}:lease:{{{}}}:users", self.prefix, lease)
    }

    /// ZSET of users whose offline the lease's node must settle: member uid, score = due ms.
    pub(crate) fn lease_pending_key(&self, lease: &str) -> String {
        format!("{}:lease:{{{}}}:pending", self.prefix, lease)
    }

    /// STRING: the node currently reaping a dead lease (a short claim).
    pub(crate) fn lease_reaper_key(&self, lease: &str) -> String {
        format!("{}:lease:{{{}}}:reaper", self.prefix, lease)
    }

    /// STREAM: one user's durable inbox (entries `d` = payload), capped by length and age.
    pub(crate) fn inbox_key(&self, user: &str) -> String {
        format!("{}:inbox:{{{}}}", self.prefix, user)
    }

    /// STRING: the id of the last inbox entry the user acknowledged.
    pub(crate) fn cursor_key(&self, user: &str) -> String {
        format!("{}:cursor:{{{}}}", self.prefix, user)
    }

    /// ZSET of the user's withdrawn inbox ids (retracted or collapsed), score = their ms.
    pub(crate) fn gone_key(&self, user: &str) -> String {
        format!("{}:gone:{{{}}}", self.prefix, user)
    }

    /// STRING: the newest inbox id the length or age cap removed.
    pub(crate) fn trimmed_key(&self, user: &str) -> String {
        format!("{}:trimmed:{{{}}}", self.prefix, user)
    }

    /// The prefix the Functions library checks inbox keys against.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// STREAM of online/offline events, and the pub/sub channel of the same name.
    pub(crate) fn events_key(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// Reads a channel name back into what it carries. Channels outside this prefix, or
    /// with an empty user or topic, or another node's canary, yield `None`.
    pub(crate) fn parse_channel<'a>(&self, channel: &'a str) -> Option<Channel<'a>> {
        let rest = channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(':')?;
        if let Some(user) = tagged(rest, "user:") {
            return Some(Channel::User(user));
        }
        if let Some(topic) = tagged(rest, "topic:") {
            return Some(Channel::Topic(topic));
        }
        match rest {
            "broadcast" => Some(Channel::Broadcast),
            "ctl" => Some(Channel::Control),
            _ if rest
                .strip_prefix("node:")
                .and_then(|r| r.strip_suffix(":canary"))
                == Some(self.node.as_str()) =>
            {
                Some(Channel::Canary)
            }
            _ => None,
        }
    }
}

/// The non-empty name in `<kind>{<name>}`, or `None`.
fn tagged<'a>(rest: &'a str, kind: &str) -> Option<&'a str> {
    let name = rest
        .strip_prefix(kind)?
        .strip_prefix('{')?
        .strip_suffix('}')?;
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The part of a key Redis Cluster hashes: the text between the first `{` and the next
    /// `}` when it is not empty, else the whole key.
    fn hashed(key: &str) -> &str {
        if let Some(open) = key.find('{') {
            if let Some(len) = key[open + 1..].find('}') {
                if len > 0 {
                    return &key[open + 1..open + 1 + len];
                }
            }
        }
        key
    }

    #[test]
    fn everything_of_one_user_shares_one_slot_and_global_keys_share_the_events_slot() {
        let k = Keys::new("hx", "n1");
        for user in ["42", "a:b", "ünï", "x|y"] {
            for key in [
                k.user_channel(user),
                k.presence_key(user),
                k.inbox_key(user),
                k.cursor_key(user),
                k.gone_key(user),
                k.trimmed_key(user),
            ] {
                assert_eq!(hashed(&key), user, "{key}");
            }
        }
        assert_eq!(hashed(&k.topic_channel("news")), "news");
        let events = k.events_key();
        assert_eq!(hashed(&k.online_key()), hashed(&events));
        assert!(
            k.online_key().starts_with("hx:"),
            "node ACLs cover `<prefix>:*`"
        );
        for key in [
            k.lease_key("n1~7"),
            k.lease_users_key("n1~7"),
            k.lease_pending_key("n1~7"),
            k.lease_reaper_key("n1~7"),
        ] {
            assert_eq!(hashed(&key), "n1~7", "{key}");
        }
    }

    #[test]
    fn channels_round_trip_through_parse() {
        let k = Keys::new("hx", "n1");
        assert_eq!(
            k.parse_channel(&k.user_channel("42")),
            Some(Channel::User("42"))
        );
        assert_eq!(
            k.parse_channel(&k.user_channel("a:b")),
            Some(Channel::User("a:b"))
        );
        assert_eq!(
            k.parse_channel(&k.broadcast_channel()),
            Some(Channel::Broadcast)
        );
        assert_eq!(
            k.parse_channel(&k.topic_channel("t")),
            Some(Channel::Topic("t"))
        );
        assert_eq!(
            k.parse_channel(&k.control_channel()),
            Some(Channel::Control)
        );
        assert_eq!(k.parse_channel(&k.canary_channel()), Some(Channel::Canary));
    }

    #[test]
    fn foreign_and_empty_channels_are_ignored() {
        let k = Keys::new("hx", "n1");
        assert_eq!(k.parse_channel("other:user:{1}"), None);
        assert_eq!(k.parse_channel("hxuser:1"), None);
        assert_eq!(k.parse_channel("hx:user:"), None);
        assert_eq!(k.parse_channel("hx:user:{}"), None);
        assert_eq!(
            k.parse_channel("hx:user:1"),
            None,
            "untagged names are not herald's"
        );
        assert_eq!(k.parse_channel("hx:user:{1"), None);
        assert_eq!(k.parse_channel("hx:topic:"), None);
        assert_eq!(k.parse_channel("hx:topic:{}"), None);
        assert_eq!(k.parse_channel("hx:node:n2:canary"), None);
        assert_eq!(k.parse_channel("hx:nothing"), None);
    }
}
