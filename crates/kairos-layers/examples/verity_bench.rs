//! Times what a layer image's protection costs where it is made (build, upgrade): the
//! whole-file SHA-256 (the manifest's checksum) and the dm-verity tree appended to a copy.
//! `cargo run --release -p kairos-layers --example verity_bench -- IMAGE` (bench/verity.sh).

use std::time::Instant;

fn main() {
    let path = std::env::args().nth(1).expect("usage: verity_bench IMAGE");
    let size = std::fs::metadata(&path).expect("the image").len();
    let t = Instant::now();
    kairos_layers::sha256_file(path.as_ref()).expect("hashing");
    let sha = t.elapsed();
    let copy = format!("{path}.bench-copy");
    std::fs::copy(&path, &copy).expect("copying");
    let t = Instant::now();
    let v = kairos_layers::verity::append_tree(copy.as_ref()).expect("tree");
    let tree = t.elapsed();
    let grown = std::fs::metadata(&copy).unwrap().len() - size;
    std::fs::remove_file(&copy).unwrap();
    let mib = size as f64 / (1 << 20) as f64;
    println!(
        "BENCH image_mib={mib:.1} sha256_ms={} tree_ms={} tree_bytes={grown} tree_share={:.4} root={}",
        sha.as_millis(),
        tree.as_millis(),
        grown as f64 / size as f64,
        &v.root[..12]
    );
}
