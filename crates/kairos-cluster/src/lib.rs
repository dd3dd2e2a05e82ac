//! Kubernetes on the node: the provider part of Kairos (provider-kairos), in Rust.
//!
//! - [`single`]: a node's `k3s:`, `k3s-agent:`, `k0s:` and `k0s-worker:` blocks → the env
//!   file, the service override and the services to enable, as Kairos writes them (a pure
//!   plan; the agent applies it beneath the root).
//!
//! - [`kubevip`]: the `kubevip:` block → kube-vip's RBAC and DaemonSet (or static pod) on
//!   the masters.
//!
//! - [`roles`]: roles over the mesh — the election, the assignment and what each role adds
//!   to the plan ([`single::Extra`]), as pure functions over the ledger bucket.

pub mod kubevip;
pub mod roles;
pub mod single;
