//! Legacy PC devices on the port bus: the 8250 serial console, the i8042 controller and the
//! CMOS clock.

pub mod cmos;
pub mod i8042;
pub mod serial;
