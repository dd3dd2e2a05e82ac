//! Kubernetes on the node: the provider part of Kairos (provider-kairos), in Rust.
//!
//! - [`single`]: a node's `k3s:`, `k3s-agent:`, `k0s:` and `k0s-worker:` blocks → the env
//!   file, the service override and the services to enable, as Kairos writes them (a pure
//!   plan; the agent applies it beneath the root).
//!
//! Roles elected over the mesh, the join token and the kubeconfig in the ledger come next
//! (issue 11); they add to the same plan ([`single::Extra`]: the env and args a role adds).

pub mod single;
