//! The device set as snapshot record bodies: one DEVICE record per stateful device, numbered
//! by a fixed instance, each body the device's own saved state (postcard). The snapshot code
//! loops over these parts; a device added here needs no change there.

use super::{
    CmosRegisters, DeviceState, GenerationId, I8042Registers, SerialRegisters, VirtioState,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;

/// DEVICE record instances.
pub const DEVICE_SERIAL: u32 = 0;
/// Optional on load (snapshots from before it load its power-on state).
pub const DEVICE_CMOS: u32 = 1;
/// Optional on load: a restore makes a new generation anyway.
pub const DEVICE_GENERATION: u32 = 2;
/// Optional on load (snapshots from before it load its power-on state).
pub const DEVICE_I8042: u32 = 3;
/// virtio-mmio slot `i` is instance `DEVICE_VIRTIO_BASE + i`; a missing slot loads its
/// power-on state.
pub const DEVICE_VIRTIO_BASE: u32 = 16;

fn encode<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>, String> {
    postcard::to_stdvec(value).map_err(|e| format!("cannot encode the {what}: {e}"))
}

fn decode<T: DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, String> {
    match postcard::take_from_bytes(body) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(format!(
            "DEVICE record for the {what}: {} unexpected bytes after the body",
            rest.len()
        )),
        Err(e) => Err(format!("DEVICE record for the {what}: bad body: {e}")),
    }
}

impl DeviceState {
    /// Every device's record body, by instance.
    pub fn encode_parts(&self) -> Result<Vec<(u32, Vec<u8>)>, String> {
        let mut parts = vec![
            (DEVICE_SERIAL, encode("serial port", &self.serial)?),
            (DEVICE_CMOS, encode("CMOS", &self.cmos)?),
            (
                DEVICE_GENERATION,
                encode("generation id", &self.generation)?,
            ),
            (DEVICE_I8042, encode("i8042", &self.i8042)?),
        ];
        for (slot, state) in self.virtio.iter().enumerate() {
            parts.push((
                DEVICE_VIRTIO_BASE + slot as u32,
                encode("virtio device", state)?,
            ));
        }
        Ok(parts)
    }

    /// The device state from record bodies by instance; instances this VMM does not know, a
    /// missing serial and gaps between virtio slots are refused.
    pub fn decode_parts(parts: &BTreeMap<u32, &[u8]>) -> Result<Self, String> {
        let virtio_slots = super::virtio::VIRTIO_SLOTS as u32;
        if let Some(unknown) = parts.keys().find(|&&d| {
            d > DEVICE_I8042
                && !(DEVICE_VIRTIO_BASE..DEVICE_VIRTIO_BASE + virtio_slots).contains(&d)
        }) {
            return Err(format!(
                "DEVICE record for device {unknown}, which this VM does not have"
            ));
        }
        let serial: SerialRegisters = parts
            .get(&DEVICE_SERIAL)
            .map(|b| decode("serial port (device 0)", b))
            .transpose()?
            .ok_or("no DEVICE record for the serial port (device 0)")?;
        let cmos: CmosRegisters = parts
            .get(&DEVICE_CMOS)
            .map(|b| decode("CMOS (device 1)", b))
            .transpose()?
            .unwrap_or_default();
        if cmos.nvram.len() != 128 || cmos.index >= 128 {
            return Err(format!(
                "DEVICE record for the CMOS (device 1): {} NVRAM bytes and register {:#x} \
                 selected (128 bytes, 0-0x7f)",
                cmos.nvram.len(),
                cmos.index
            ));
        }
        let generation: GenerationId = parts
            .get(&DEVICE_GENERATION)
            .map(|b| decode("generation id (device 2)", b))
            .transpose()?
            .unwrap_or_default();
        let i8042: I8042Registers = parts
            .get(&DEVICE_I8042)
            .map(|b| decode("i8042 (device 3)", b))
            .transpose()?
            .unwrap_or_default();
        let mut virtio: Vec<VirtioState> = Vec::new();
        for (&instance, body) in parts.range(DEVICE_VIRTIO_BASE..) {
            let slot = instance - DEVICE_VIRTIO_BASE;
            if slot as usize != virtio.len() {
                return Err(format!(
                    "DEVICE record for virtio slot {slot}, but none for slot {}",
                    virtio.len()
                ));
            }
            virtio.push(decode(
                &format!("virtio slot {slot} (device {instance})"),
                body,
            )?);
        }
        Ok(Self {
            serial,
            cmos,
            i8042,
            generation,
            virtio,
        })
    }
}
