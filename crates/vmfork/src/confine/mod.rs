//! Confinement of the VMM: seccomp allow-lists per thread kind ([`seccomp`]), the data
//! directory API paths resolve in ([`data_dir`]), the jailer mode ([`jail`]), and dropping
//! privileges ([`privileges`]).

pub mod data_dir;
pub mod jail;
pub mod privileges;
pub mod seccomp;
