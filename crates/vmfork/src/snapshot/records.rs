//! Each stateful component's save and load handler: the record it becomes in a snapshot stream
//! and how its body is encoded (postcard, whose wire format is stable). Loading gathers every
//! record first and only then builds the state, so the order of records in the stream never
//! matters (Xen's migration v2 once applied records in stream order and restored page tables
//! before the vCPU flags they depended on).

use crate::devices::DeviceState;
use crate::memory::{MemoryLayout, PAGE_SIZE};
use crate::state::{IrqchipState, VcpuState, VmState};
use crate::vm::VmConfig;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use vmfork_format::{Record, RecordType};

/// A component's state as a record: its type and how its body is encoded.
pub trait StateRecord: Serialize + DeserializeOwned {
    const KIND: RecordType;

    fn encode(&self) -> Result<Vec<u8>, String> {
        postcard::to_stdvec(self).map_err(|e| format!("cannot encode {}: {e}", Self::KIND.name()))
    }

    fn decode(record: &Record) -> Result<Self, String> {
        let (value, rest) = postcard::take_from_bytes(&record.body).map_err(|e| {
            format!(
                "{} record at byte {}: bad body: {e}",
                Self::KIND.name(),
                record.offset
            )
        })?;
        if !rest.is_empty() {
            return Err(format!(
                "{} record at byte {}: {} unexpected bytes after the body",
                Self::KIND.name(),
                record.offset,
                rest.len()
            ));
        }
        Ok(value)
    }
}

/// VM_CONFIG: the shape of the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigRecord {
    pub vcpus: u8,
    pub mem_bytes: u64,
    pub irqchip: bool,
}

impl StateRecord for ConfigRecord {
    const KIND: RecordType = RecordType::VmConfig;
}

impl StateRecord for MemoryLayout {
    const KIND: RecordType = RecordType::MemoryLayout;
}

impl StateRecord for VcpuState {
    const KIND: RecordType = RecordType::Vcpu;
}

impl StateRecord for IrqchipState {
    const KIND: RecordType = RecordType::Irqchip;
}

/// CLOCK: kvmclock, so guest time does not jump across a restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockRecord {
    pub clock_ns: u64,
}

impl StateRecord for ClockRecord {
    const KIND: RecordType = RecordType::Clock;
}

/// MEMORY_FILE: where guest RAM is and how to check it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFileRecord {
    /// File name inside the snapshot directory; empty when the pages are embedded in the
    /// stream (MEMORY_PAGES records).
    pub name: String,
    /// Bytes of RAM the file covers (its size).
    pub size: u64,
    /// For a diff snapshot: the pages it holds, as runs of `(first page offset, page count)`;
    /// every other page comes from the base. Empty for a full snapshot.
    pub diff_runs: Vec<(u64, u64)>,
    /// Pages with data (not holes) and the CRC32 of their bytes in offset order.
    pub data_pages: u64,
    pub crc32: u32,
}

impl StateRecord for MemoryFileRecord {
    const KIND: RecordType = RecordType::MemoryFile;
}

/// SNAPSHOT_ID: a random id naming this snapshot, so diffs can name their base.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotIdRecord {
    pub id: [u8; 16],
    pub created_unix_s: u64,
}

impl StateRecord for SnapshotIdRecord {
    const KIND: RecordType = RecordType::SnapshotId;
}

/// BASE: the snapshot a diff is on top of, by id and memory checksum, and where it was.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseRecord {
    pub id: [u8; 16],
    pub memory_crc32: u32,
    /// The base's directory when the diff was written (absolute).
    pub path: String,
}

impl StateRecord for BaseRecord {
    const KIND: RecordType = RecordType::Base;
}

/// Every record a snapshot's state is made of, in the order they are written.
pub fn save_records(
    config: &VmConfig,
    state: &VmState,
    id: &SnapshotIdRecord,
    memory: &MemoryFileRecord,
    base: Option<&BaseRecord>,
) -> Result<Vec<(RecordType, u32, Vec<u8>)>, String> {
    let mut out = vec![
        (RecordType::SnapshotId, 0, id.encode()?),
        (
            RecordType::VmConfig,
            0,
            ConfigRecord {
                vcpus: config.vcpus,
                mem_bytes: config.mem_bytes,
                irqchip: config.irqchip,
            }
            .encode()?,
        ),
        (RecordType::MemoryLayout, 0, state.memory.encode()?),
        (RecordType::MemoryFile, 0, memory.encode()?),
    ];
    if let Some(base) = base {
        out.push((RecordType::Base, 0, base.encode()?));
    }
    for (i, vcpu) in state.vcpus.iter().enumerate() {
        out.push((RecordType::Vcpu, i as u32, vcpu.encode()?));
    }
    if let Some(chip) = &state.irqchip {
        out.push((RecordType::Irqchip, 0, chip.encode()?));
    }
    if let Some(clock) = &state.clock {
        let body = ClockRecord {
            clock_ns: clock.clock,
        };
        out.push((RecordType::Clock, 0, body.encode()?));
    }
    for (instance, body) in state.devices.encode_parts()? {
        out.push((RecordType::Device, instance, body));
    }
    Ok(out)
}

/// A snapshot's state records, gathered (any order) and checked for consistency.
#[derive(Clone, Debug)]
pub struct LoadedState {
    pub id: SnapshotIdRecord,
    pub config: VmConfig,
    pub state: VmState,
    pub memory: MemoryFileRecord,
    pub base: Option<BaseRecord>,
}

/// Gathers `records` (in any order), rejects duplicates, missing records and records for vCPUs
/// or devices the VM does not have, then builds the state in dependency order: the config
/// first, then what is checked against it.
pub fn load_records(records: &[Record]) -> Result<LoadedState, String> {
    let mut singles: BTreeMap<RecordType, &Record> = BTreeMap::new();
    let mut vcpus: BTreeMap<u32, &Record> = BTreeMap::new();
    let mut devices: BTreeMap<u32, &Record> = BTreeMap::new();
    for record in records {
        if record.flags & vmfork_format::FLAG_IGNORE != 0 {
            continue;
        }
        let Some(kind) = record.known_type() else {
            continue; // an unknown OPTIONAL record: the reader let it through to be skipped
        };
        let slot = match kind {
            RecordType::Vcpu => vcpus.insert(record.instance, record),
            RecordType::Device => devices.insert(record.instance, record),
            RecordType::MemoryPages | RecordType::End => continue,
            other => {
                if record.instance != 0 {
                    return Err(format!(
                        "{} record at byte {} has instance {}; only 0 is defined",
                        other.name(),
                        record.offset,
                        record.instance
                    ));
                }
                singles.insert(other, record)
            }
        };
        if slot.is_some() {
            return Err(format!(
                "duplicate {} record (instance {}) at byte {}",
                kind.name(),
                record.instance,
                record.offset
            ));
        }
    }
    let single = |kind: RecordType| {
        singles
            .get(&kind)
            .copied()
            .ok_or_else(|| format!("no {} record", kind.name()))
    };

    let id = SnapshotIdRecord::decode(single(RecordType::SnapshotId)?)?;
    let c = ConfigRecord::decode(single(RecordType::VmConfig)?)?;
    let mut config = VmConfig {
        vcpus: c.vcpus,
        mem_bytes: c.mem_bytes,
        irqchip: c.irqchip,
        disks: Vec::new(),
        vsock: None,
        net: None,
        emulation_assist: false,
        hide_cpu_features: Vec::new(),
    };
    config.validate().map_err(|e| e.to_string())?;
    let layout = MemoryLayout::decode(single(RecordType::MemoryLayout)?)?;
    if layout != MemoryLayout::for_size(config.mem_bytes).map_err(|e| e.to_string())? {
        return Err(format!(
            "memory layout does not match {} MiB of RAM",
            config.mem_bytes >> 20
        ));
    }
    let memory = MemoryFileRecord::decode(single(RecordType::MemoryFile)?)?;
    if memory.size != config.mem_bytes {
        return Err(format!(
            "memory file record covers {} bytes, the VM has {}",
            memory.size, config.mem_bytes
        ));
    }
    check_runs(&memory.diff_runs, memory.size)?;
    let base = singles
        .get(&RecordType::Base)
        .map(|r| BaseRecord::decode(r))
        .transpose()?;

    if let Some(&extra) = vcpus.keys().find(|&&i| i >= u32::from(config.vcpus)) {
        return Err(format!(
            "VCPU record for vCPU {extra}, but the VM has {} vCPUs",
            config.vcpus
        ));
    }
    let vcpu_states = (0..u32::from(config.vcpus))
        .map(|i| {
            let record = vcpus
                .get(&i)
                .ok_or_else(|| format!("no VCPU record for vCPU {i}"))?;
            VcpuState::decode(record)
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(v) = vcpu_states
        .iter()
        .position(|v| v.lapic.is_some() != config.irqchip)
    {
        return Err(format!(
            "vCPU {v}'s local APIC state does not match irqchip={}",
            config.irqchip
        ));
    }

    let irqchip = singles
        .get(&RecordType::Irqchip)
        .map(|r| IrqchipState::decode(r))
        .transpose()?;
    if irqchip.is_some() != config.irqchip {
        return Err(format!(
            "IRQCHIP record {} but the VM has irqchip={}",
            if irqchip.is_some() {
                "present"
            } else {
                "missing"
            },
            config.irqchip
        ));
    }
    let clock = singles
        .get(&RecordType::Clock)
        .map(|r| ClockRecord::decode(r))
        .transpose()?
        .map(|c| kvm_bindings::kvm_clock_data {
            clock: c.clock_ns,
            ..Default::default()
        });

    let bodies = devices
        .iter()
        .map(|(&instance, record)| (instance, record.body.as_slice()))
        .collect();
    let devices = DeviceState::decode_parts(&bodies)?;
    config.disks = devices.disks();
    config.vsock = devices.vsock();
    config.net = devices.net().map(|(config, _)| config);

    Ok(LoadedState {
        id,
        config,
        state: VmState {
            vcpus: vcpu_states,
            irqchip,
            clock,
            devices,
            memory: layout,
        },
        memory,
        base,
    })
}

/// Diff page runs must be page-aligned, ascending, non-overlapping and inside RAM.
fn check_runs(runs: &[(u64, u64)], size: u64) -> Result<(), String> {
    let mut next = 0u64;
    for &(first, count) in runs {
        let end = count
            .checked_mul(PAGE_SIZE)
            .and_then(|len| first.checked_add(len));
        match end {
            Some(end) if first % PAGE_SIZE == 0 && first >= next && count > 0 && end <= size => {
                next = end;
            }
            _ => {
                return Err(format!(
                    "diff page run {first:#x}+{count} pages is misaligned, out of order or \
                     outside the {size}-byte RAM"
                ))
            }
        }
    }
    Ok(())
}
