#![no_std]
//! Map layout shared by the eBPF programs and the agent.
