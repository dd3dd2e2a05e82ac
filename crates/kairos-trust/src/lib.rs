//! Trusted boot (issue 12), the parts that need no firmware: a UKI assembled on
//! systemd-stub by our own PE writer ([`pe`]), PCR 11 predicted for every boot phase
//! ([`pcr`]), and the policy signed with the owner's PCR key ([`policy`]). Pure: no
//! external commands, no files; kairosctl feeds it bytes and writes what it returns.

pub mod measured;
pub mod pcr;
pub mod pe;
pub mod policy;
pub mod signature;
