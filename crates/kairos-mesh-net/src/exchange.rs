//! Anti-entropy between two of our own peers, over a stream of [`LEDGER_PROTOCOL`]: every
//! sync interval a node compares its ledger with one peer's, and only when they differ (a
//! delta was lost, or one of them is new) do they send each other their whole blocks. Each
//! node talks to one peer per interval, so a network of N nodes sends O(N) small messages
//! per interval instead of N whole blocks to everyone.
//!
//! 1. The opener writes its storage [`ledger::digest`] as a sealed [`Sync::Digest`].
//! 2. The other side answers only if that opens with the network's key (current or previous
//!    rotation) — a stranger reads nothing: the same digest when the ledgers agree (done),
//!    else its whole block as a sealed [`Sync::Delta`].
//! 3. The opener merges it and answers with its own whole block, which the other merges.
//!
//! A frame is a 4-byte big-endian length and the sealed message, bounded by the token's
//! `max_message_size`; the whole exchange by [`TIMEOUT`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use kairos_mesh::Token;
use kairos_mesh::ledger::{self, Sync};
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
        let now = crate::unix_nanos() / 1_000_000_000;
        let interval = self.token.otp.crypto.interval.max(1);
        [
            self.token.seal_key(now),
            self.token.seal_key(now.saturating_sub(interval)),
        ]
    }

    fn digest(&self) -> [u8; 32] {
        ledger::digest(&crate::lock(&self.ledger).last().storage)
    }

    fn frame(&self, m: &Sync) -> Vec<u8> {
        let msg = ledger::sync_to_wire(m, &self.keys()[0]);
        let mut out = (msg.len() as u32).to_be_bytes().to_vec();
        out.extend(msg);
        out
    }

    fn whole(&self) -> Vec<u8> {
        let block = crate::lock(&self.ledger).last().clone();
        self.frame(&Sync::Delta(block))
    }

    /// Opens a peer's message; `None` when it is not sealed by one of ours.
    fn open(&self, msg: &[u8]) -> Option<Sync> {
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

async fn read_frame(s: &mut libp2p::Stream, limit: usize) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.ok()?;
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return None;
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await.ok()?;
    Some(buf)
}

/// Compares ledgers with `peer` (we open the stream), and exchanges whole blocks if they
/// differ.
pub async fn with(mut control: libp2p_stream::Control, peer: PeerId, shared: Shared) {
    let run = async {
        let mut s = control.open_stream(peer, LEDGER_PROTOCOL).await.ok()?;
        s.write_all(&shared.frame(&Sync::Digest(shared.digest())))
            .await
            .ok()?;
        s.flush().await.ok()?;
        let msg = read_frame(&mut s, shared.limit()).await?;
        if let Some(Sync::Delta(theirs)) = shared.open(&msg) {
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
                    let msg = read_frame(&mut s, shared.limit()).await?;
                    // Not sealed with our key: say nothing.
                    let Some(Sync::Digest(theirs)) = shared.open(&msg) else {
                        return None;
                    };
                    let mine = shared.digest();
                    if theirs == mine {
                        s.write_all(&shared.frame(&Sync::Digest(mine))).await.ok()?;
                        return s.close().await.ok();
                    }
                    s.write_all(&shared.whole()).await.ok()?;
                    s.flush().await.ok()?;
                    let msg = read_frame(&mut s, shared.limit()).await?;
                    if let Some(Sync::Delta(b)) = shared.open(&msg) {
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
