//! Legacy PC devices on the port bus: the 8250 serial console and the i8042 controller.

pub mod i8042;
pub mod serial;
