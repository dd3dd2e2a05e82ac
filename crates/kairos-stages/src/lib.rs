//! The yip-compatible stage engine.
//!
//! [`loader`] reads documents (plain yip or `#cloud-config`), [`dag`] orders their steps,
//! [`executor`] checks conditionals and runs each step's modules in yip's fixed order against
//! a target root, and [`runner`] finds the documents of a stage the way `kairos-agent
//! run-stage` does.

pub mod accounts;
pub mod dag;
pub mod executor;
pub mod loader;
pub mod modules;
pub mod runner;

pub use executor::{Executor, Report};
