//! Record types. Numbers are forever: never reuse or renumber one; add new ones at the end.

/// The record types vmfork writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u32)]
pub enum RecordType {
    /// Closes the stream.
    End = 0,
    /// VM shape: vCPU count, RAM size, irqchip (body: component-defined).
    VmConfig = 1,
    /// Guest RAM regions and where each lives in the memory file.
    MemoryLayout = 2,
    /// One vCPU's full state; instance = vCPU index.
    Vcpu = 3,
    /// In-kernel PIC, IOAPIC and PIT.
    Irqchip = 4,
    /// kvmclock.
    Clock = 5,
    /// A device's state; instance = device id.
    Device = 6,
    /// Where the memory is: file name, size, which pages are present, checksum.
    MemoryFile = 7,
    /// Guest pages embedded in the stream: {first page offset u64, count u64, bytes}.
    MemoryPages = 8,
    /// The snapshot a diff is based on: id and checksum.
    Base = 9,
    /// This snapshot's id and creation time.
    SnapshotId = 10,
    /// A disk's written chunks embedded in the stream; instance = virtio slot:
    /// {first chunk u64, count u64, count × 4096 bytes}.
    DiskChunks = 11,
}

impl RecordType {
    pub const ALL: [RecordType; 12] = [
        RecordType::End,
        RecordType::VmConfig,
        RecordType::MemoryLayout,
        RecordType::Vcpu,
        RecordType::Irqchip,
        RecordType::Clock,
        RecordType::Device,
        RecordType::MemoryFile,
        RecordType::MemoryPages,
        RecordType::Base,
        RecordType::SnapshotId,
        RecordType::DiskChunks,
    ];

    pub fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.iter().copied().find(|t| *t as u32 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            RecordType::End => "END",
            RecordType::VmConfig => "VM_CONFIG",
            RecordType::MemoryLayout => "MEMORY_LAYOUT",
            RecordType::Vcpu => "VCPU",
            RecordType::Irqchip => "IRQCHIP",
            RecordType::Clock => "CLOCK",
            RecordType::Device => "DEVICE",
            RecordType::MemoryFile => "MEMORY_FILE",
            RecordType::MemoryPages => "MEMORY_PAGES",
            RecordType::Base => "BASE",
            RecordType::SnapshotId => "SNAPSHOT_ID",
            RecordType::DiskChunks => "DISK_CHUNKS",
        }
    }
}

/// A type number's name, or `type N` for unknown ones.
pub fn record_name(kind: u32) -> String {
    RecordType::from_u32(kind)
        .map(|t| t.name().to_string())
        .unwrap_or_else(|| format!("type {kind}"))
}
