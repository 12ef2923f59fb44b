//! Confinement of the VMM: seccomp allow-lists per thread kind ([`seccomp`]), the data
//! directory API paths resolve in ([`data_dir`]), and dropping privileges ([`privileges`]).

pub mod data_dir;
pub mod privileges;
pub mod seccomp;
