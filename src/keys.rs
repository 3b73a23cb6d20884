//! Builds every Redis key and pub/sub channel name from the configured prefix, and parses
//! channel names back into delivery targets. No other module formats a key.

/// Where a published payload goes, as read from its channel name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target<'a> {
    /// `<prefix>:user:<uid>`: every session of one user.
    User(&'a str),
    /// `<prefix>:broadcast`: every session.
    Broadcast,
    /// `<prefix>:topic:<name>`: sessions that joined the topic.
    Topic(&'a str),
    /// `<prefix>:ctl`: node-to-node control messages (disconnect a user).
    Control,
    /// `<prefix>:node:<id>:canary`: a node's private liveness probe.
    Canary,
}

/// Key and channel builder bound to one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    node: String,
}

impl Keys {
    pub fn new(prefix: &str, node_id: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
            node: node_id.to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Channel carrying notifications for one user.
    pub fn user_channel(&self, user: &str) -> String {
        format!("{}:user:{}", self.prefix, user)
    }

    /// Channel carrying notifications for every session.
    pub fn broadcast_channel(&self) -> String {
        format!("{}:broadcast", self.prefix)
    }

    /// Channel carrying notifications for a topic.
    pub fn topic_channel(&self, topic: &str) -> String {
        format!("{}:topic:{}", self.prefix, topic)
    }

    /// Channel every node subscribes to for control messages.
    pub fn control_channel(&self) -> String {
        format!("{}:ctl", self.prefix)
    }

    /// This node's private canary channel.
    pub fn canary_channel(&self) -> String {
        format!("{}:node:{}:canary", self.prefix, self.node)
    }

    /// ZSET of one user's live sessions: member `<session>|<node>|<connected_at ms>`,
    /// score = expiry in Redis-server milliseconds.
    pub fn presence_key(&self, user: &str) -> String {
        format!("{}:presence:{}", self.prefix, user)
    }

    /// ZSET of users with at least one session: member user id, score = latest expiry.
    pub fn users_key(&self) -> String {
        format!("{}:users", self.prefix)
    }

    /// ZSET of live nodes: member node id, score = expiry.
    pub fn nodes_key(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    /// HASH describing one node (connections, users, started_at, listen), with a TTL.
    pub fn node_key(&self, node: &str) -> String {
        format!("{}:node:{}", self.prefix, node)
    }

    /// STREAM: one user's durable inbox (entries `d` = payload), capped by length and age.
    pub fn inbox_key(&self, user: &str) -> String {
        format!("{}:inbox:{}", self.prefix, user)
    }

    /// STRING: the id of the last inbox entry the user acknowledged.
    pub fn cursor_key(&self, user: &str) -> String {
        format!("{}:cursor:{}", self.prefix, user)
    }

    /// STREAM of online/offline events, and the pub/sub channel of the same name.
    pub fn events_key(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// HASH user -> reason of offline events waiting out the grace window.
    pub fn offline_pending_key(&self) -> String {
        format!("{}:offline-pending", self.prefix)
    }

    /// Prefix of every node info key, for scripts that look nodes up by id.
    pub fn node_key_prefix(&self) -> String {
        format!("{}:node:", self.prefix)
    }

    /// Reads a channel name back into a delivery target. Channels outside this prefix, or
    /// with an empty user or topic, yield `None`.
    pub fn parse_channel<'a>(&self, channel: &'a str) -> Option<Target<'a>> {
        let rest = channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(':')?;
        if let Some(user) = rest.strip_prefix("user:") {
            return (!user.is_empty()).then_some(Target::User(user));
        }
        if let Some(topic) = rest.strip_prefix("topic:") {
            return (!topic.is_empty()).then_some(Target::Topic(topic));
        }
        match rest {
            "broadcast" => Some(Target::Broadcast),
            "ctl" => Some(Target::Control),
            _ if rest
                .strip_prefix("node:")
                .and_then(|r| r.strip_suffix(":canary"))
                == Some(self.node.as_str()) =>
            {
                Some(Target::Canary)
            }
            _ => None,
        }
    }
}

/// User ids and topic names travel inside channel names and keys. They may be any
/// printable text except whitespace and control characters, up to 256 bytes.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && s.chars().all(|c| !c.is_control() && !c.is_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_round_trip_through_parse() {
        let k = Keys::new("hx", "n1");
        assert_eq!(
            k.parse_channel(&k.user_channel("42")),
            Some(Target::User("42"))
        );
        assert_eq!(
            k.parse_channel(&k.user_channel("a:b")),
            Some(Target::User("a:b"))
        );
        assert_eq!(
            k.parse_channel(&k.broadcast_channel()),
            Some(Target::Broadcast)
        );
        assert_eq!(
            k.parse_channel(&k.topic_channel("t")),
            Some(Target::Topic("t"))
        );
        assert_eq!(k.parse_channel(&k.control_channel()), Some(Target::Control));
        assert_eq!(k.parse_channel(&k.canary_channel()), Some(Target::Canary));
    }

    #[test]
    fn foreign_and_empty_channels_are_ignored() {
        let k = Keys::new("hx", "n1");
        assert_eq!(k.parse_channel("other:user:1"), None);
        assert_eq!(k.parse_channel("hxuser:1"), None);
        assert_eq!(k.parse_channel("hx:user:"), None);
        assert_eq!(k.parse_channel("hx:topic:"), None);
        assert_eq!(k.parse_channel("hx:node:n2:canary"), None);
        assert_eq!(k.parse_channel("hx:nothing"), None);
    }

    #[test]
    fn names_reject_whitespace_and_control_characters() {
        assert!(valid_name("user-42@example.com"));
        assert!(valid_name("ünïcode"));
        assert!(!valid_name(""));
        assert!(!valid_name("a b"));
        assert!(!valid_name("a\nb"));
        assert!(!valid_name(&"x".repeat(257)));
    }
}
