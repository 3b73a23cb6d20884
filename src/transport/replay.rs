//! What a session is sent from its user's durable inbox: at connect, the welcome (with the
//! unread count) and the replay after `since` or the read cursor; after a broken
//! subscription, the catch-up from the last durable id the session was sent. Both run
//! while the session is held, after its subscription is in place, so the live copies of
//! what they send are dropped by id, with no hole between inbox and live delivery.
//!
//! The inbox is reached through the [`InboxPort`] the node hands in; transport knows
//! nothing of Redis.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::client::Client;
use super::outbox::{Outgoing, Released};
use crate::metrics as m;
use crate::protocol::{message_frame, CloseReason, InboxEntry, ServerFrame, StreamId};

/// A boxed future, as a dyn-compatible trait returns it.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why the inbox could not answer (only logged and counted: the session goes on with live
/// messages).
pub(crate) type PortError = Box<dyn std::error::Error + Send + Sync>;

/// Where a replay starts, and its first page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Opening {
    /// The replay starts after this id (`None`: from the oldest entry).
    pub(crate) start: Option<StreamId>,
    /// Entries after `start` were dropped by the inbox caps: the replay is incomplete.
    pub(crate) trimmed: bool,
    /// Entries after the user's read cursor (when asked for).
    pub(crate) unread: Option<u64>,
    /// The first page.
    pub(crate) page: Page,
}

/// A page of inbox entries, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Page {
    /// The entries still worth delivering (expired ones are left out).
    pub(crate) entries: Vec<InboxEntry>,
    /// The last id the page looked at, expired entries included: the next page starts
    /// after it. `None` when the page reached the end of the inbox.
    pub(crate) next: Option<StreamId>,
}

/// What an acknowledgement did to the user's read cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Acked {
    /// The cursor moved.
    pub(crate) moved: bool,
    /// The cursor now (an ack moves it at most to the newest entry the inbox holds).
    pub(crate) cursor: Option<StreamId>,
}

/// What a session needs of the durable inbox: replay reads and acknowledgements.
pub(crate) trait InboxPort: Send + Sync {
    /// Opens a replay for `user`: after `after`, or (with `after_cursor`) after the later of
    /// `after` and the user's read cursor; with the first `count` entries, and the unread
    /// count when `count_unread`.
    fn open<'a>(
        &'a self,
        user: &'a str,
        after: Option<StreamId>,
        after_cursor: bool,
        count_unread: bool,
        count: usize,
    ) -> BoxFuture<'a, Result<Opening, PortError>>;
    /// Up to `count` entries after `after`, oldest first.
    fn page<'a>(
        &'a self,
        user: &'a str,
        after: StreamId,
        count: usize,
    ) -> BoxFuture<'a, Result<Page, PortError>>;
    /// Moves the user's read cursor forward to `id` (at most to the newest entry) and
    /// tells the user's other sessions; `session` is the one that read it.
    fn ack<'a>(
        &'a self,
        user: &'a str,
        id: StreamId,
        session: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Acked, PortError>>;
}

/// Entries read from the inbox per round trip: bounds node memory per replaying session to
/// this many payloads.
pub(crate) const REPLAY_PAGE: usize = 16;

/// Limits of one replay or catch-up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReplayLimits {
    /// Most entries sent to one connection at once (`--replay-limit`).
    pub(crate) max_entries: usize,
    /// Larger entries are skipped and counted (`--max-message-bytes`).
    pub(crate) max_bytes: usize,
    /// A frame the client does not take within this time ends it as slow (`--write-timeout`).
    pub(crate) write_timeout: Duration,
}

/// Sends the welcome (built by `welcome` from the unread count), then replays the durable
/// inbox after `since` (or after the user's read cursor) in pages, with a gap frame when
/// entries were lost. Returns where the replay started: the client has everything up to
/// there, so the caller ends the greeting dropping live copies up to it.
pub(crate) async fn greet(
    client: &Client,
    inbox: &dyn InboxPort,
    welcome: impl FnOnce(Option<u64>) -> String,
    user: &str,
    since: Option<StreamId>,
    limits: ReplayLimits,
) -> Result<Option<StreamId>, CloseReason> {
    let first = REPLAY_PAGE.min(limits.max_entries);
    // Without the inbox the session still goes live: it is parked for a catch-up as soon as
    // the node's subscription is rebuilt, which replays what this could not.
    let opening = retried("inbox_replay", || {
        inbox.open(user, since, since.is_none(), true, first)
    })
    .await;
    let unread = opening.as_ref().and_then(|o| o.unread);
    send_text(client, welcome(unread), limits.write_timeout).await?;
    let Some(opening) = opening else {
        return Ok(since);
    };
    let start = opening.start;
    let sent = deliver(client, inbox, user, opening, limits).await?;
    metrics::counter!(m::MESSAGES_REPLAYED).increment(sent as u64);
    Ok(start)
}

/// Catches a live session up after its subscription broke: sends what the inbox holds
/// after the last durable id the session was sent (and after the user's read cursor), in
/// order, then releases the live deliveries parked meanwhile, dropping their copies of what
/// was sent. Repeats while further catch-ups were asked for. Returns how many entries were
/// sent. When the inbox cannot be read (after a few tries) the session cannot be made whole
/// here, so it ends with [`CloseReason::Resync`]: the client reconnects and replays from
/// its `since`, losing nothing.
pub(crate) async fn catch_up(
    client: &Client,
    inbox: &dyn InboxPort,
    user: &str,
    limits: ReplayLimits,
) -> Result<usize, CloseReason> {
    let mut total = 0;
    while let Some(request) = client.catch_up_start() {
        let first = REPLAY_PAGE.min(limits.max_entries);
        let opened = retried("inbox_catch_up", || {
            inbox.open(user, request.after, true, false, first)
        })
        .await;
        let Some(opening) = opened else {
            return Err(CloseReason::Resync);
        };
        total += deliver(client, inbox, user, opening, limits).await?;
        if client.finish_catch_up(request) != Released::StillHeld {
            break;
        }
    }
    metrics::counter!(m::MESSAGES_CAUGHT_UP).increment(total as u64);
    Ok(total)
}

/// Pauses between tries of an inbox read: a command connection broken by the same network
/// event as the subscription fails once and is replaced, so a second try usually works.
/// The later pauses (3.5 s in all) cover a Redis Cluster failover: a node can hear every
/// shard's canary again, become ready and start its catch-up while the cluster still
/// answers the failed shard's slots with `MOVED` to the dead master or `CLUSTERDOWN`
/// (the promotion reaches every cluster node by gossip, within about a second). Giving up
/// earlier closed live sessions (1012, "resync") right after such a failover.
const RETRY_PAUSES: [Duration; 4] = [
    Duration::from_millis(100),
    Duration::from_millis(400),
    Duration::from_millis(1000),
    Duration::from_millis(2000),
];

/// Runs an inbox read, trying again after each of [`RETRY_PAUSES`]; `None` when every try
/// failed (each failure is logged and counted under `op`).
async fn retried<'a, T>(
    op: &'static str,
    mut read: impl FnMut() -> BoxFuture<'a, Result<T, PortError>>,
) -> Option<T> {
    for pause in RETRY_PAUSES.iter().map(Some).chain([None]) {
        match read().await {
            Ok(v) => return Some(v),
            Err(e) => inbox_failed(op, &*e),
        }
        if let Some(p) = pause {
            tokio::time::sleep(*p).await;
        }
    }
    None
}

/// Sends an opened replay: a `trimmed` gap first when entries were lost, then the entries
/// page by page up to the limit, then a `replay_limit` gap if more are pending. Returns how
/// many messages were sent (oversize entries count towards the limit but are skipped).
/// A page that cannot be read after retries ends the session with
/// [`CloseReason::Resync`]: going live with part of a replay would hide the rest.
async fn deliver(
    client: &Client,
    inbox: &dyn InboxPort,
    user: &str,
    opening: Opening,
    limits: ReplayLimits,
) -> Result<usize, CloseReason> {
    let wt = limits.write_timeout;
    if opening.trimmed {
        send_text(client, ServerFrame::Gap { reason: "trimmed" }.to_text(), wt).await?;
    }
    let label = format!("user:{user}");
    let limit = limits.max_entries;
    let mut page = opening.page;
    let (mut sent, mut delivered) = (0usize, 0usize);
    loop {
        for entry in std::mem::take(&mut page.entries) {
            if sent == limit {
                send_text(
                    client,
                    ServerFrame::Gap {
                        reason: "replay_limit",
                    }
                    .to_text(),
                    wt,
                )
                .await?;
                return Ok(delivered);
            }
            sent += 1;
            if entry.data.len() > limits.max_bytes {
                metrics::counter!(m::MESSAGES_DROPPED, "reason" => "oversize").increment(1);
                continue;
            }
            let id = entry.id.to_string();
            let frame = message_frame(&label, Some(&id), None, &entry.data);
            client
                .send_held(&Outgoing::text(frame, Some(entry.id)), wt)
                .await?;
            delivered += 1;
        }
        let Some(after) = page.next else {
            return Ok(delivered);
        };
        // One entry more than the limit allows tells whether a gap frame is due.
        let want = REPLAY_PAGE.min(limit - sent + 1);
        page = match retried("inbox_replay", || inbox.page(user, after, want)).await {
            Some(p) => p,
            None => return Err(CloseReason::Resync),
        };
    }
}

fn inbox_failed(op: &'static str, e: &(dyn std::error::Error + Send + Sync)) {
    tracing::warn!(error = %e, op, "inbox read failed; continuing with live messages");
    metrics::counter!(m::REDIS_ERRORS, "op" => op).increment(1);
}

/// Writes one frame of the welcome or a replay (the session is held: live deliveries wait
/// behind it). A client that does not take it within `wait` is a slow consumer.
async fn send_text(client: &Client, text: String, wait: Duration) -> Result<(), CloseReason> {
    client.send_held(&Outgoing::text(text, None), wait).await
}
