//! EdgeVPN's leader function (`pkg/utils/leader.go`): of a list of ids, the one whose 32-bit
//! FNV-1a hash is largest; on a tie the earliest wins. Every node computes the same leader
//! from the same list, with no messages.

/// 32-bit FNV-1a of a string's UTF-8 bytes.
pub fn fnv1a32(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The leader of `ids`, `None` for an empty list.
pub fn leader<S: AsRef<str>>(ids: &[S]) -> Option<&str> {
    let mut best: Option<(u32, &str)> = None;
    for id in ids {
        let h = fnv1a32(id.as_ref());
        if best.is_none_or(|(b, _)| h > b) {
            best = Some((h, id.as_ref()));
        }
    }
    best.map(|(_, id)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// EdgeVPN's `leader_test.go` vectors.
    #[test]
    fn spec_vectors() {
        let l = |v: &[&str]| leader(v).unwrap().to_string();
        assert_eq!(l(&["a", "b", "c", "d"]), "b");
        assert_eq!(l(&["a", "b", "c", "d", "e", "f", "G", "bb"]), "b");
        assert_eq!(
            l(&["a", "b", "c", "d", "e", "f", "G", "bb", "z", "b1", "b2"]),
            "z"
        );
        assert_eq!(l(&["1", "2", "3", "4", "5"]), "2");
        assert_eq!(l(&["1", "2", "3", "4", "5", "6", "7", "21", "22"]), "22");
        assert_eq!(leader::<&str>(&[]), None);
        assert_eq!(fnv1a32(""), 0x811c_9dc5);
    }
}
