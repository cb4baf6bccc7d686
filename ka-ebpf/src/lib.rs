//! Empty on purpose: the programs are the `ka` binary (built for the BPF
//! target by `ka-agent`'s build script). This library exists so `ka-agent`
//! can declare a build-dependency on this crate and be rebuilt when it changes.
#![no_std]
