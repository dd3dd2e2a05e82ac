//! dm-verity hash trees for layer images (trusted boot).
//!
//! A layer image is the EROFS filesystem followed by its dm-verity hash tree, in one file
//! (`layers/sha256-<hex>.erofs`): the store, install copies, upgrades and garbage collection
//! keep handling one file per layer. The tree is the kernel's format version 1 with no
//! superblock (what `veritysetup format --no-superblock --salt=-` writes at
//! `--hash-offset=<data size>`): 4 KiB data and hash blocks, SHA-256, no salt, the top level
//! first. Nothing random goes in, so a workstation building a signed UKI and a node importing
//! the same layer compute the same root hash — the value the UKI pins.
//!
//! Everything here is pure (bytes in, bytes out) except [`append_tree`], which extends an
//! image file the writer has just made.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// Data and hash block size.
pub const BLOCK: u64 = 4096;
/// SHA-256 digests per hash block.
const PER_BLOCK: u64 = BLOCK / 32;
/// The largest image treated (64 GiB): bounds the level-0 hashes kept in memory (16 MiB).
pub const MAX_DATA: u64 = 64 << 30;

/// The device-mapper uuid of a layer set up at boot starts with this (see [`dm_uuid`]).
pub const DM_UUID_PREFIX: &str = "KAIROS-VERITY-";

/// The device-mapper name of layer `index` (base first) at boot.
pub fn dm_name(index: usize) -> String {
    format!("kairos-layer-{index}")
}

/// The device-mapper uuid of layer `index` with `root`: unique even when a deployment
/// holds the same layer twice, and how `state` finds the root again ([`parse_dm_uuid`]).
pub fn dm_uuid(root: &str, index: usize) -> String {
    format!("{DM_UUID_PREFIX}{root}-{index}")
}

/// `(root, index)` from a uuid made by [`dm_uuid`]; `None` for any other device.
pub fn parse_dm_uuid(uuid: &str) -> Option<(&str, usize)> {
    let (root, index) = uuid.strip_prefix(DM_UUID_PREFIX)?.split_once('-')?;
    (root.len() == 64 && root.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some((root, index.parse().ok()?))
}

/// Where a layer image's hash tree starts and what its root is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verity {
    /// Root hash, hex (what a signed UKI pins).
    pub root: String,
    /// Bytes of filesystem before the tree (a multiple of [`BLOCK`]); the tree follows.
    pub data_size: u64,
}

impl Verity {
    /// Data blocks covered.
    pub fn data_blocks(&self) -> u64 {
        self.data_size / BLOCK
    }

    /// The file size this description implies: data, then the tree.
    pub fn file_size(&self) -> u64 {
        self.data_size + tree_size(self.data_size)
    }

    /// The problem with this description for a file of `file_size` bytes, if any: a
    /// description read from an unsigned manifest decides nothing before this passes.
    pub fn check(&self, file_size: u64) -> Result<(), String> {
        if self.root.len() != 64 || !self.root.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("root hash {:?} is not 64 hex digits", self.root));
        }
        if self.data_size == 0 || !self.data_size.is_multiple_of(BLOCK) || self.data_size > MAX_DATA
        {
            return Err(format!(
                "data size {} is not a whole number of 4 KiB blocks up to 64 GiB",
                self.data_size
            ));
        }
        if self.file_size() != file_size {
            return Err(format!(
                "the file has {file_size} bytes, but {} bytes of data and their hash tree make {}",
                self.data_size,
                self.file_size()
            ));
        }
        Ok(())
    }

    /// The device-mapper table line of this tree when data and tree are both on `dev`
    /// (`major:minor`): one `verity` target over the data, the tree starting right after.
    pub fn table(&self, dev: &str) -> String {
        let blocks = self.data_blocks();
        format!(
            "0 {} verity 1 {dev} {dev} {BLOCK} {BLOCK} {blocks} {blocks} sha256 {} -",
            self.data_size / 512,
            self.root.to_ascii_lowercase()
        )
    }
}

/// Blocks in each level of the tree over `data_blocks`, the level just above the data
/// first (the kernel's level 0). One data block needs no tree: its own hash is the root.
pub fn levels(data_blocks: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut n = data_blocks;
    while n > 1 {
        n = n.div_ceil(PER_BLOCK);
        out.push(n);
    }
    out
}

/// Bytes of hash tree for `data_size` bytes of data.
pub fn tree_size(data_size: u64) -> u64 {
    levels(data_size.div_ceil(BLOCK)).iter().sum::<u64>() * BLOCK
}

fn sha256(block: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(block).into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hashes `hashes` (32 bytes each) into blocks of [`PER_BLOCK`], zero-padded: the next level.
fn hash_blocks(hashes: &[u8]) -> Vec<u8> {
    let per = BLOCK as usize;
    let mut blocks = Vec::with_capacity(hashes.len().div_ceil(per) * per);
    for chunk in hashes.chunks(per) {
        blocks.extend_from_slice(chunk);
        blocks.resize(blocks.len().div_ceil(per) * per, 0);
    }
    blocks
}

/// The hash tree (top level first, as it is stored) and the root hash of `data_blocks`
/// blocks read from `data`.
pub fn build_tree(data: &mut dyn Read, data_blocks: u64) -> io::Result<(Vec<u8>, String)> {
    if data_blocks == 0 || data_blocks > MAX_DATA / BLOCK {
        return Err(io::Error::other(format!(
            "{data_blocks} data blocks: a layer image has 1 to {} blocks",
            MAX_DATA / BLOCK
        )));
    }
    let mut block = vec![0u8; BLOCK as usize];
    let mut level0 = Vec::with_capacity(data_blocks as usize * 32);
    for _ in 0..data_blocks {
        data.read_exact(&mut block)?;
        level0.extend_from_slice(&sha256(&block));
    }
    if data_blocks == 1 {
        return Ok((Vec::new(), hex(&level0)));
    }
    // Level i's blocks hash into level i+1 until one block is left; its hash is the root.
    let mut stored: Vec<Vec<u8>> = Vec::new();
    let mut hashes = level0;
    loop {
        let blocks = hash_blocks(&hashes);
        let count = blocks.len() as u64 / BLOCK;
        hashes = blocks.chunks(BLOCK as usize).flat_map(sha256).collect();
        stored.push(blocks);
        if count == 1 {
            break;
        }
    }
    let root = hex(&hashes);
    stored.reverse();
    Ok((stored.concat(), root))
}

/// Appends the hash tree to the image at `path` (first padded with zeros to a whole
/// block), syncs it, and says where the tree starts and what its root is.
pub fn append_tree(path: &Path) -> io::Result<Verity> {
    let mut f = fs::OpenOptions::new().read(true).write(true).open(path)?;
    let len = f.metadata()?.len();
    let data_size = len.div_ceil(BLOCK) * BLOCK;
    if data_size == 0 || data_size > MAX_DATA {
        return Err(io::Error::other(format!(
            "{len} bytes: a layer image has 1 byte to 64 GiB"
        )));
    }
    f.set_len(data_size)?;
    f.seek(SeekFrom::Start(0))?;
    let (tree, root) = build_tree(
        &mut io::BufReader::with_capacity(1 << 20, &mut f),
        data_size / BLOCK,
    )?;
    f.seek(SeekFrom::Start(data_size))?;
    f.write_all(&tree)?;
    f.sync_all()?;
    Ok(Verity { root, data_size })
}

/// Reads the description of a tree already at the end of an image, given where its data
/// ends: the root is the hash of the top tree block (or of the only data block). Used for
/// a layer found in a store without a manifest naming it; the root is then only what the
/// file says — pins are what is trusted.
pub fn read_tree(path: &Path, data_size: u64) -> io::Result<Verity> {
    let mut f = fs::File::open(path)?;
    let len = f.metadata()?.len();
    let probe = Verity {
        root: "0".repeat(64),
        data_size,
    };
    probe.check(len).map_err(io::Error::other)?;
    let at = if data_size == BLOCK { 0 } else { data_size };
    f.seek(SeekFrom::Start(at))?;
    let mut block = vec![0u8; BLOCK as usize];
    f.read_exact(&mut block)?;
    Ok(Verity {
        root: hex(&sha256(&block)),
        data_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_shapes() {
        assert_eq!(levels(1), Vec::<u64>::new());
        assert_eq!(levels(2), vec![1]);
        assert_eq!(levels(128), vec![1]);
        assert_eq!(levels(129), vec![2, 1]);
        assert_eq!(levels(128 * 128 + 1), vec![129, 2, 1]);
        assert_eq!(tree_size(129 * BLOCK), 3 * BLOCK);
        assert_eq!(tree_size(1), 0);
    }

    #[test]
    fn a_tree_over_two_blocks_by_hand() {
        let data: Vec<u8> = (0..2 * BLOCK).map(|i| (i / BLOCK) as u8 + 1).collect();
        let (tree, root) = build_tree(&mut &data[..], 2).unwrap();
        let mut top = Vec::new();
        top.extend_from_slice(&sha256(&data[..4096]));
        top.extend_from_slice(&sha256(&data[4096..]));
        top.resize(4096, 0);
        assert_eq!(tree, top);
        assert_eq!(root, hex(&sha256(&top)));
    }

    #[test]
    fn descriptions_from_a_manifest_are_checked() {
        let v = Verity {
            root: "a".repeat(64),
            data_size: 129 * BLOCK,
        };
        assert!(v.check(132 * BLOCK).is_ok());
        assert!(v.check(131 * BLOCK).unwrap_err().contains("hash tree"));
        let bad = |root: &str, data_size| Verity {
            root: root.into(),
            data_size,
        };
        assert!(bad("zz", BLOCK).check(BLOCK).is_err());
        assert!(bad(&"a".repeat(64), 100).check(100).is_err());
        assert!(bad(&"a".repeat(64), 0).check(0).is_err());
        assert_eq!(
            v.table("7:0"),
            format!(
                "0 1032 verity 1 7:0 7:0 4096 4096 129 129 sha256 {} -",
                "a".repeat(64)
            )
        );
    }

    #[test]
    fn device_mapper_names() {
        let root = "ab".repeat(32);
        assert_eq!(dm_name(2), "kairos-layer-2");
        let u = dm_uuid(&root, 2);
        assert!(u.len() < 129, "device-mapper uuids are at most 128 bytes");
        assert_eq!(parse_dm_uuid(&u), Some((root.as_str(), 2)));
        assert_eq!(parse_dm_uuid("CRYPT-LUKS2-0123-COS_OEM"), None);
        assert_eq!(parse_dm_uuid("KAIROS-VERITY-zz-1"), None);
    }

    #[test]
    fn append_then_read_back() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        fs::write(&p, vec![7u8; 5000]).unwrap();
        let v = append_tree(&p).unwrap();
        assert_eq!(v.data_size, 2 * BLOCK);
        assert_eq!(fs::metadata(&p).unwrap().len(), v.file_size());
        assert_eq!(read_tree(&p, v.data_size).unwrap(), v);
        let one = d.path().join("one");
        fs::write(&one, b"x").unwrap();
        let v1 = append_tree(&one).unwrap();
        assert_eq!(read_tree(&one, BLOCK).unwrap(), v1);
    }
}
