//! Nodes on loopback TCP: one token's nodes share the ledger through gossipsub; a node of
//! another network is connected to them and still reads nothing, and its blocks are dropped.

use std::time::Duration;

use kairos_mesh::Token;
use kairos_mesh_net::{Node, Options};

fn opts(peers: Vec<String>) -> Options {
    Options {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        peers: peers.iter().map(|p| p.parse().unwrap()).collect(),
        sync_interval: Duration::from_secs(1),
        ..Default::default()
    }
}

/// Waits (up to a minute) for `node` to hold `want` at bucket/key.
async fn eventually(node: &Node, bucket: &str, key: &str, want: Option<&str>) -> bool {
    for _ in 0..600 {
        if node.get(bucket, key).await.unwrap().as_deref() == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn addr_of(n: &Node) -> String {
    let s = n.status().await.unwrap();
    format!("{}/p2p/{}", s.listen[0], s.peer_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_shares_the_ledger_and_outsiders_read_nothing() {
    let token = Token::generate(9000);
    let a = Node::start(token.clone(), [1; 32], opts(vec![]))
        .await
        .unwrap();
    // The libp2p PeerID is the one kairos-mesh computes from the same seed.
    assert_eq!(
        a.peer_id,
        kairos_mesh::identity::Identity::from_seed(&[1; 32]).peer_id()
    );
    let a_addr = addr_of(&a).await;
    let b = Node::start(token.clone(), [2; 32], opts(vec![a_addr.clone()]))
        .await
        .unwrap();
    let c = Node::start(token.clone(), [3; 32], opts(vec![a_addr.clone()]))
        .await
        .unwrap();
    let outsider_token = Token::generate(9000);
    let outsider = Node::start(outsider_token.clone(), [4; 32], opts(vec![a_addr]))
        .await
        .unwrap();

    a.put("kairos", "a-uuid", "{\"Time\":\"1\"}").await.unwrap();
    assert!(
        eventually(&b, "kairos", "a-uuid", Some("{\"Time\":\"1\"}")).await,
        "b got a's key"
    );
    assert!(
        eventually(&c, "kairos", "a-uuid", Some("{\"Time\":\"1\"}")).await,
        "c got a's key"
    );
    // c and b are connected only through a: what c writes reaches b through a.
    c.put("kairos", "c-uuid", "\"x\"").await.unwrap();
    assert!(
        eventually(&b, "kairos", "c-uuid", Some("\"x\"")).await,
        "b got c's key via a"
    );

    // The outsider is connected to a, and sees nothing of the network.
    let s = outsider.status().await.unwrap();
    assert!(!s.peers.is_empty(), "the outsider is connected: {s:?}");
    assert_eq!(outsider.get("kairos", "a-uuid").await.unwrap(), None);
    assert_ne!(s.topic, a.status().await.unwrap().topic);
    // Its own writes never land in the network's ledger: after it has sent its ledger
    // twice more, while a still hears its own network (c's next write arrives), a lacks it.
    outsider.put("kairos", "evil", "\"1\"").await.unwrap();
    let sent = outsider.status().await.unwrap().published;
    for _ in 0..600 {
        if outsider.status().await.unwrap().published >= sent + 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(outsider.status().await.unwrap().published >= sent + 2);
    c.put("kairos", "after", "\"y\"").await.unwrap();
    assert!(eventually(&a, "kairos", "after", Some("\"y\"")).await);
    assert_eq!(a.get("kairos", "evil").await.unwrap(), None);

    // The outsider opens a ledger comparison with a itself: sealed with its own key, or a
    // frame claiming 4 GiB or 64 KiB (more than a digest) — a answers none, and stays up.
    use futures::{AsyncReadExt, AsyncWriteExt};
    let a_id: libp2p::PeerId = a.peer_id.parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let theirs = kairos_mesh::ledger::sync_to_wire(
        &kairos_mesh::ledger::SyncMessage::Digest([0; 32]),
        &outsider_token.seal_key(now),
    );
    let mut framed = (theirs.len() as u32).to_be_bytes().to_vec();
    framed.extend(theirs);
    for frame in [framed, vec![0xff; 4], vec![0, 1, 0, 0]] {
        let mut s = outsider
            .control()
            .open_stream(a_id, kairos_mesh_net::exchange::LEDGER_PROTOCOL)
            .await
            .expect("a accepts the protocol from a connected peer");
        s.write_all(&frame).await.unwrap();
        s.flush().await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut answer)).await;
        assert!(
            answer.is_empty(),
            "a answered an outsider: {} bytes",
            answer.len()
        );
    }
    c.put("kairos", "still", "\"z\"").await.unwrap();
    assert!(
        eventually(&a, "kairos", "still", Some("\"z\"")).await,
        "a is still up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_keep_flowing_across_topic_and_key_rotations() {
    // A 2 s interval: the topic and the seal key turn several times during the test.
    let token = Token::generate(2);
    let a = Node::start(token.clone(), [5; 32], opts(vec![]))
        .await
        .unwrap();
    let b = Node::start(token.clone(), [6; 32], opts(vec![addr_of(&a).await]))
        .await
        .unwrap();
    let first_topic = a.status().await.unwrap().topic;
    for i in 0..4 {
        let v = format!("\"{i}\"");
        a.put("kairos", &format!("k{i}"), &v).await.unwrap();
        assert!(
            eventually(&b, "kairos", &format!("k{i}"), Some(&v)).await,
            "k{i} crossed"
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    assert_ne!(
        a.status().await.unwrap().topic,
        first_topic,
        "the topic rotated meanwhile"
    );
    assert_eq!(
        a.status().await.unwrap().topic,
        b.status().await.unwrap().topic
    );
}

/// A static peer that is not up when a node starts is dialled again until it is: the node
/// behind NAT must not stay alone because its bootstrap peer rebooted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_peer_down_at_start_is_dialled_again() {
    let token = Token::generate(9000);
    // A free port, released for the late node to take.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let late_id = kairos_mesh::identity::Identity::from_seed(&[7; 32]).peer_id();
    let early = Node::start(
        token.clone(),
        [6; 32],
        Options {
            redial: Duration::from_millis(500),
            ..opts(vec![format!("/ip4/127.0.0.1/tcp/{port}/p2p/{late_id}")])
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(early.status().await.unwrap().peers.is_empty());
    let late = Node::start(
        token,
        [7; 32],
        Options {
            listen: vec![format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap()],
            ..opts(vec![])
        },
    )
    .await
    .unwrap();
    early.put("kairos", "early", "1").await.unwrap();
    assert!(
        eventually(&late, "kairos", "early", Some("1")).await,
        "the early node found the late one and shared its ledger"
    );
}

async fn wait_status(node: &Node, what: &str, ok: impl Fn(&kairos_mesh_net::Status) -> bool) {
    for _ in 0..600 {
        if ok(&node.status().await.unwrap()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: {:?}", node.status().await.unwrap());
}

/// Our own peers send deltas and compare digests, not whole blocks: a change reaches the
/// others as a delta, a node that joins later is brought in step, and a
/// member that only speaks EdgeVPN's whole-block gossip (a stand-in for a Go EdgeVPN peer:
/// our node with deltas off) turns everyone back to whole blocks, and still gets every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_peers_sync_by_deltas_and_fall_back_for_edgevpn_peers() {
    let token = Token::generate(9000);
    let a = Node::start(token.clone(), [11; 32], opts(vec![]))
        .await
        .unwrap();
    let a_addr = addr_of(&a).await;
    let b = Node::start(token.clone(), [12; 32], opts(vec![a_addr.clone()]))
        .await
        .unwrap();
    wait_status(&a, "a syncs by deltas with b", |s| s.sync == "delta").await;
    let before = a.status().await.unwrap().published;
    a.put("kairos", "k1", "\"one\"").await.unwrap();
    assert!(
        eventually(&b, "kairos", "k1", Some("\"one\"")).await,
        "b got k1"
    );
    wait_status(&a, "a sent digests", |s| {
        s.comparisons >= 2 && s.deltas >= 1
    })
    .await;
    let s = a.status().await.unwrap();
    assert_eq!(
        s.published, before,
        "no whole block was gossiped between our own peers: {s:?}"
    );

    // c joins later and gets what was written before it came (by a comparison, or by the
    // whole block a sends a member it does not yet know for one of ours).
    let c = Node::start(token.clone(), [13; 32], opts(vec![a_addr.clone()]))
        .await
        .unwrap();
    assert!(
        eventually(&c, "kairos", "k1", Some("\"one\"")).await,
        "c got k1"
    );

    // An EdgeVPN-like member: everyone goes back to whole blocks, and it reads the ledger.
    let go = Node::start(
        token.clone(),
        [14; 32],
        Options {
            delta: false,
            ..opts(vec![a_addr])
        },
    )
    .await
    .unwrap();
    assert!(
        eventually(&go, "kairos", "k1", Some("\"one\"")).await,
        "the EdgeVPN-like peer got k1"
    );
    wait_status(&a, "a falls back to whole blocks", |s| s.sync == "full").await;
    b.put("kairos", "k2", "\"two\"").await.unwrap();
    assert!(
        eventually(&go, "kairos", "k2", Some("\"two\"")).await,
        "the EdgeVPN-like peer got k2"
    );
    assert!(
        eventually(&c, "kairos", "k2", Some("\"two\"")).await,
        "c got k2"
    );
}
