//! The parts of the `quiver` command line that other programs use too: the routing client of
//! a sharded region ([`route`]), which `quiver-bench` drives.

pub mod route;
