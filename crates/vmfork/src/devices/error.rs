//! What goes wrong building, wiring and loading devices: the host resource a device cannot
//! have (with the system's error as its source), a configuration that cannot work, or saved
//! state that does not fit. The API answers all three with 400 (the request named them).

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A host resource a device needs cannot be had: a tap, a socket path, a thread.
    #[error("invalid VM configuration: {device}: {what}: {source}")]
    Host {
        device: &'static str,
        what: String,
        #[source]
        source: io::Error,
    },
    /// A disk image that cannot be used (its error names it).
    #[error("invalid VM configuration: {0}")]
    Image(#[source] io::Error),
    /// A device set that cannot be built: too many devices, an endpoint for a device the VM
    /// lacks.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// Saved state that does not fit the device loading it (another device's, out of range: a
    /// snapshot's or a hostile one).
    #[error("{0}")]
    State(String),
}

/// Constructors of the library error, for the device code's `crate::Result`s.
impl DeviceError {
    pub(crate) fn host(
        device: &'static str,
        what: impl Into<String>,
        source: io::Error,
    ) -> crate::Error {
        Self::Host {
            device,
            what: what.into(),
            source,
        }
        .into()
    }

    pub(crate) fn image(source: io::Error) -> crate::Error {
        Self::Image(source).into()
    }

    pub(crate) fn config(message: impl Into<String>) -> crate::Error {
        Self::Config(message.into()).into()
    }

    pub(crate) fn state(message: impl Into<String>) -> crate::Error {
        Self::State(message.into()).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn a_host_failure_keeps_the_systems_error_as_its_source() {
        let e = DeviceError::host(
            "virtio-net",
            "cannot open the tap",
            io::Error::from_raw_os_error(libc::EBUSY),
        );
        assert!(matches!(e, crate::Error::Device(DeviceError::Host { .. })));
        assert!(e
            .to_string()
            .starts_with("invalid VM configuration: virtio-net: cannot open the tap: "));
        let source = e.source().expect("the io error");
        assert_eq!(
            source
                .downcast_ref::<io::Error>()
                .and_then(io::Error::raw_os_error),
            Some(libc::EBUSY)
        );
        assert!(DeviceError::state("x").source().is_none());
    }
}
