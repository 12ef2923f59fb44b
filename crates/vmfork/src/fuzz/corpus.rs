//! The corpus: inputs that reached something new, kept in memory and (with a directory) on
//! disk, one file per input named by its hash, so a run can stop and resume where it was.

use crate::error::{Error, Result};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

pub struct Corpus {
    inputs: Vec<Vec<u8>>,
    hashes: HashSet<u64>,
    dir: Option<PathBuf>,
}

/// FNV-1a, 64-bit: stable across runs and versions (file names depend on it).
pub fn hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Corpus {
    pub fn new(dir: Option<&Path>) -> Result<Self> {
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Invalid(format!("cannot create {}: {e}", dir.display())))?;
        }
        Ok(Self {
            inputs: Vec::new(),
            hashes: HashSet::new(),
            dir: dir.map(Path::to_path_buf),
        })
    }

    pub fn len(&self) -> usize {
        self.inputs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }

    pub fn get(&self, i: usize) -> &[u8] {
        &self.inputs[i]
    }

    /// Adds `input` (and writes it to the directory) unless it is already in.
    pub fn add(&mut self, input: &[u8]) -> Result<bool> {
        let h = hash(input);
        if !self.hashes.insert(h) {
            return Ok(false);
        }
        if let Some(dir) = &self.dir {
            let path = dir.join(format!("{h:016x}"));
            std::fs::write(&path, input)
                .map_err(|e| Error::Invalid(format!("cannot write {}: {e}", path.display())))?;
        }
        self.inputs.push(input.to_vec());
        Ok(true)
    }
}

/// Every regular file in `dir` (not recursive), sorted by name, each at most `max` bytes
/// (longer ones are cut). A missing directory is an error; an empty one is not.
pub fn read_inputs(dir: &Path, max: usize) -> Result<Vec<Vec<u8>>> {
    let io = |e: std::io::Error| Error::Invalid(format!("cannot read {}: {e}", dir.display()));
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .collect();
    paths.sort();
    let mut inputs = Vec::with_capacity(paths.len());
    for path in paths {
        let mut bytes = std::fs::read(&path).map_err(io)?;
        bytes.truncate(max);
        inputs.push(bytes);
    }
    Ok(inputs)
}
