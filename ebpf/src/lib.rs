#![no_std]
//! Empty library target: lets the agent declare this crate as a build-dependency so
//! cargo rebuilds the agent when the eBPF programs change.
