//! Anti-entropy between two of our own peers, over a stream of [`LEDGER_PROTOCOL`]: every
//! sync interval a node compares its ledger with one peer's, and only when they differ (a
//! delta was lost, or one of them is new) do they send each other their whole blocks. Each
//! node talks to one peer per interval, so a network of N nodes sends O(N) small messages
//! per interval instead of N whole blocks to everyone.
//!
//! 1. The opener writes its storage [`ledger::digest`] as a sealed [`SyncMessage::Digest`].
//! 2. The other side answers only if that opens with the network's key (current or previous
//!    rotation) — a stranger reads nothing: the same digest when the ledgers agree (done),
//!    else its whole block as a sealed [`SyncMessage::Delta`].
//! 3. The opener merges it and answers with its own whole block, which the other merges.
//!
//! A frame is a 4-byte big-endian length and the sealed message, bounded by the token's
//! `max_message_size`; the whole exchange by [`TIMEOUT`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use kairos_mesh::Token;
use kairos_mesh::ledger::{self, SyncMessage};
use kairos_mesh::state::Ledger;
use libp2p::{PeerId, StreamProtocol};

pub const LEDGER_PROTOCOL: StreamProtocol = StreamProtocol::new("/kairos/ledger/1.0.0");
pub const TIMEOUT: Duration = Duration::from_secs(15);
/// Exchanges answered at once; more wait.
const CONCURRENT: usize = 8;

/// What the exchanges need: the ledger and the keys to seal with.
#[derive(Clone)]
pub struct Shared {
    pub ledger: Arc<Mutex<Ledger>>,
    pub changed: Arc<tokio::sync::Notify>,
    pub token: Token,
    pub exchanges: Arc<std::sync::atomic::AtomicU64>,
}

impl Shared {
    fn keys(&self) -> [[u8; 32]; 2] {
        self.token.open_keys(crate::unix_nanos() / 1_000_000_000)
    }

    fn digest(&self) -> [u8; 32] {
        ledger::digest(&crate::lock(&self.ledger).last().storage)
    }

    fn frame(&self, m: &SyncMessage) -> Vec<u8> {
        let msg = ledger::sync_to_wire(m, &self.keys()[0]);
        let mut out = (msg.len() as u32).to_be_bytes().to_vec();
        out.extend(msg);
        out
    }

    fn whole(&self) -> Vec<u8> {
        let block = crate::lock(&self.ledger).last().clone();
        self.frame(&SyncMessage::Delta(block))
    }

    /// Opens a peer's message; `None` when it is not sealed by one of ours.
    fn open(&self, msg: &[u8]) -> Option<SyncMessage> {
        let max = self.token.max_message_size;
        self.keys()
            .iter()
            .find_map(|k| ledger::sync_from_wire(msg, k, max).ok())
    }

    fn merge(&self, block: &ledger::Block) {
        crate::merge(&self.ledger, &self.changed, block);
        self.exchanges
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn limit(&self) -> usize {
        self.token.max_message_size as usize + 64
    }
}

/// A sealed digest is 12 + 1 + 32 + 16 = 61 bytes: the most an opener's first frame may hold,
/// read before anything shows the opener is one of ours.
const DIGEST_FRAME: usize = 64;
/// How long the opener has to send its digest (a stranger must not hold a slot for long).
const FIRST_FRAME: Duration = Duration::from_secs(5);

/// Reads one frame of at most `limit` bytes; the buffer grows as the bytes arrive, so a
/// length claimed but never sent costs nothing.
async fn read_frame(s: &mut libp2p::Stream, limit: usize) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.ok()?;
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return None;
    }
    let mut buf = Vec::with_capacity(len.min(64 << 10));
    (&mut *s)
        .take(len as u64)
        .read_to_end(&mut buf)
        .await
        .ok()?;
    (buf.len() == len).then_some(buf)
}

/// Compares ledgers with `peer` (we open the stream), and exchanges whole blocks if they
/// differ.
pub async fn with(mut control: libp2p_stream::Control, peer: PeerId, shared: Shared) {
    let run = async {
        let mut s = control.open_stream(peer, LEDGER_PROTOCOL).await.ok()?;
        s.write_all(&shared.frame(&SyncMessage::Digest(shared.digest())))
            .await
            .ok()?;
        s.flush().await.ok()?;
        let msg = read_frame(&mut s, shared.limit()).await?;
        if let Some(SyncMessage::Delta(theirs)) = shared.open(&msg) {
            let mine = shared.whole();
            shared.merge(&theirs);
            s.write_all(&mine).await.ok()?;
        }
        let _ = s.close().await;
        Some(())
    };
    let _ = tokio::time::timeout(TIMEOUT, run).await;
}

/// Answers exchanges opened by peers, [`CONCURRENT`] at a time.
pub fn serve(mut control: libp2p_stream::Control, shared: Shared) {
    let Ok(mut incoming) = control.accept(LEDGER_PROTOCOL) else {
        return;
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENT));
    tokio::spawn(async move {
        while let Some((_peer, mut s)) = incoming.next().await {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let run = async {
                    let msg = tokio::time::timeout(FIRST_FRAME, read_frame(&mut s, DIGEST_FRAME))
                        .await
                        .ok()??;
                    // Not sealed with our key: say nothing.
                    let Some(SyncMessage::Digest(theirs)) = shared.open(&msg) else {
                        return None;
                    };
                    let mine = shared.digest();
                    if theirs == mine {
                        s.write_all(&shared.frame(&SyncMessage::Digest(mine)))
                            .await
                            .ok()?;
                        return s.close().await.ok();
                    }
                    s.write_all(&shared.whole()).await.ok()?;
                    s.flush().await.ok()?;
                    let msg = read_frame(&mut s, shared.limit()).await?;
                    if let Some(SyncMessage::Delta(b)) = shared.open(&msg) {
                        shared.merge(&b);
                    }
                    s.close().await.ok()
                };
                let _ = tokio::time::timeout(TIMEOUT, run).await;
                drop(slot);
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The opener's digest frame fits the bound the other side reads it with.
    #[test]
    fn a_sealed_digest_fits_the_first_frame_bound() {
        let m = ledger::sync_to_wire(&SyncMessage::Digest([7; 32]), &[1; 32]);
        assert!(m.len() <= DIGEST_FRAME, "{} bytes", m.len());
        assert!(m.len() + 32 > DIGEST_FRAME, "the bound is tight");
    }
}
