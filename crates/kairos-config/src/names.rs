//! Checks for names and fields that end up in identity files and kernel paths.
//!
//! A user name with a `:` or a newline would add a line to `/etc/passwd`; a sysctl key
//! `../../etc/shadow` would name a file outside `/proc/sys`. Each check returns a message that
//! names the offending value and what is allowed; `validate` reports them with the key, and the
//! stage modules refuse them before touching a file.

/// The longest user or group name Linux tools accept (useradd's default limit).
pub const NAME_MAX: usize = 32;
/// The kernel's limit for a hostname (`HOST_NAME_MAX`).
pub const HOSTNAME_MAX: usize = 64;

/// A user or group name: POSIX portable characters (`A-Z a-z 0-9 . _ -`), not starting with
/// `-`, at most 32 bytes; a final `$` (machine accounts) is allowed.
pub fn account_name(what: &str, name: &str) -> Result<(), String> {
    let body = name.strip_suffix('$').unwrap_or(name);
    if name.is_empty() {
        return Err(format!("{what} name is empty"));
    }
    if name.len() > NAME_MAX {
        return Err(format!(
            "{what} name {name:?} is longer than {NAME_MAX} characters"
        ));
    }
    if name.starts_with('-') {
        return Err(format!("{what} name {name:?} must not start with `-`"));
    }
    if body.is_empty()
        || !body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        || body.bytes().all(|b| b.is_ascii_digit())
        || body == "."
        || body == ".."
    {
        return Err(format!(
            "{what} name {name:?} is not a portable name: use letters, digits, `.`, `_` and `-` (not all digits)"
        ));
    }
    Ok(())
}

/// A free-text field of a colon-separated identity file (gecos, home, shell, password hash).
pub fn field(what: &str, value: &str) -> Result<(), String> {
    if let Some(c) = value
        .chars()
        .find(|c| matches!(c, ':' | '\n' | '\r' | '\0'))
    {
        return Err(format!(
            "{what} {value:?} contains {}, which would corrupt /etc/passwd or /etc/shadow",
            match c {
                ':' => "`:`",
                '\0' => "a NUL byte",
                _ => "a line break",
            }
        ));
    }
    Ok(())
}

/// A home directory: an absolute path that is a valid passwd field.
pub fn homedir(value: &str) -> Result<(), String> {
    field("homedir", value)?;
    if !value.starts_with('/') {
        return Err(format!("homedir {value:?} must be an absolute path"));
    }
    Ok(())
}

/// A hostname as RFC 1123 allows and the kernel accepts: dot-separated labels of letters,
/// digits and `-` (not at either end of a label), each 1–63 bytes, 64 bytes in all.
pub fn hostname(name: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("hostname {name:?} {why}"));
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > HOSTNAME_MAX {
        return bad(&format!("is longer than {HOSTNAME_MAX} characters"));
    }
    for label in name.strip_suffix('.').unwrap_or(name).split('.') {
        if label.is_empty() || label.len() > 63 {
            return bad("has an empty or over-long (63+) label between dots");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return bad("may only contain letters, digits, `-` and `.` (RFC 1123)");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("has a label that starts or ends with `-`");
        }
    }
    Ok(())
}

/// A sysctl key (`net.ipv4.ip_forward` or `net/ipv4/ip_forward`): relative, no empty or `..`
/// component, only the characters kernel parameter names use.
pub fn sysctl_key(key: &str) -> Result<(), String> {
    let ok_chars = key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'/' | b'_' | b'-' | b'*' | b':'));
    let comps: Vec<&str> = key.split(['.', '/']).collect();
    if key.is_empty() || !ok_chars || comps.iter().any(|c| c.is_empty()) {
        return Err(format!(
            "sysctl key {key:?} is not a kernel parameter name (like net.ipv4.ip_forward)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_names() {
        for ok in ["kairos", "ops-1", "_apt", "a.b", "host$", "systemd-network"] {
            assert!(account_name("user", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a:b",
            "a\nroot::0:0::/:/bin/sh",
            "-rf",
            "123",
            "..",
            "a b",
            "a/b",
            &"x".repeat(33),
        ] {
            let e = account_name("user", bad).unwrap_err();
            assert!(e.contains("user name"), "{e}");
        }
    }

    #[test]
    fn fields_and_homes() {
        assert!(field("gecos", "Kairos User,,,").is_ok());
        assert!(field("gecos", "x:0:0").unwrap_err().contains("`:`"));
        assert!(field("shell", "/bin/sh\nroot").is_err());
        assert!(field("shell", "a\0b").unwrap_err().contains("NUL"));
        assert!(homedir("/home/kairos").is_ok());
        assert!(homedir("home").is_err());
        assert!(homedir("/x:/y").is_err());
    }

    #[test]
    fn hostnames() {
        for ok in [
            "node1",
            "kairos-abc",
            "a.example.com",
            "a.example.com.",
            "1node",
        ] {
            assert!(hostname(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a..b",
            "a_b",
            "a b",
            "n\n127.0.0.1 evil",
            &"a".repeat(65),
        ] {
            assert!(hostname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sysctl_keys() {
        assert!(sysctl_key("net.ipv4.ip_forward").is_ok());
        assert!(sysctl_key("net/ipv4/conf/eth0/rp_filter").is_ok());
        assert!(sysctl_key("vm.nr_hugepages").is_ok());
        for bad in ["/etc/shadow", "..", "a..b", "net/../../etc", "a b", ""] {
            assert!(sysctl_key(bad).is_err(), "{bad}");
        }
    }
}
