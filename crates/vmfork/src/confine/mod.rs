//! Confinement of the VMM: seccomp allow-lists per thread kind ([`seccomp`]).

pub mod seccomp;
