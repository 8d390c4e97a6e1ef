//! The config-file source: reads the file, validates it, and keeps the last accepted
//! version of every service whose new text is rejected, so a bad edit never takes a
//! working service down. A file that does not parse at all changes nothing. A change
//! is taken in only once the file stayed the same (size, mtime and content hash) for
//! one poll, so a file rewritten in place is not applied half-written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lb_core::config::{self, ServiceError, ServiceSpec};

/// The outcome of one read.
#[derive(Debug)]
pub enum Read {
    /// The file's bytes did not change since the last read.
    Unchanged,
    /// The services to serve now; `rejected` says what was refused (and, for a
    /// service that was running, that its previous version stays).
    Services {
        services: Vec<ServiceSpec>,
        rejected: Vec<ServiceError>,
    },
    /// The file could not be read or parsed; the running state stays as it is.
    Invalid(String),
}

pub struct FileSource {
    path: PathBuf,
    last_bytes: Option<Vec<u8>>,
    /// A change seen at the last read, taken in when the next read finds it unchanged.
    settling: Option<Fingerprint>,
    /// The last accepted version of each service, by name.
    accepted: BTreeMap<String, ServiceSpec>,
}

impl FileSource {
    pub fn new(path: &Path) -> Self {
        FileSource {
            path: path.to_path_buf(),
            last_bytes: None,
            settling: None,
            accepted: BTreeMap::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file; `force` re-evaluates at once, even when the bytes are unchanged
    /// (the first read, SIGHUP). Otherwise a change counts once the next read finds the
    /// file as it was.
    pub fn read(&mut self, force: bool) -> Read {
        let (bytes, fingerprint) = match read_file(&self.path) {
            Ok(read) => read,
            Err(e) => return Read::Invalid(format!("cannot read {}: {e}", self.path.display())),
        };
        if !force && self.last_bytes.as_ref() == Some(&bytes) {
            self.settling = None;
            return Read::Unchanged;
        }
        if !force && self.settling.as_ref() != Some(&fingerprint) {
            tracing::debug!(config = %self.path.display(), "changed; applied once it stays so for one poll");
            self.settling = Some(fingerprint);
            return Read::Unchanged;
        }
        self.settling = None;
        self.last_bytes = Some(bytes.clone());
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => return Read::Invalid(format!("{}: not UTF-8: {e}", self.path.display())),
        };
        match config::parse(&text) {
            Ok(parsed) => {
                let (services, rejected) = self.merge(parsed.services, parsed.rejected);
                Read::Services { services, rejected }
            }
            Err(e) => Read::Invalid(format!("{}: {e}", self.path.display())),
        }
    }

    /// New valid services replace their previous versions; a rejected service that
    /// was accepted before keeps that version; services no longer in the file go.
    fn merge(
        &mut self,
        valid: Vec<ServiceSpec>,
        mut rejected: Vec<ServiceError>,
    ) -> (Vec<ServiceSpec>, Vec<ServiceError>) {
        let mut next: BTreeMap<String, ServiceSpec> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        for spec in valid {
            order.push(spec.name.clone());
            next.insert(spec.name.clone(), spec);
        }
        for error in &mut rejected {
            if next.contains_key(&error.service) {
                continue;
            }
            if let Some(previous) = self.accepted.get(&error.service) {
                order.push(error.service.clone());
                next.insert(error.service.clone(), previous.clone());
                error
                    .reason
                    .push_str("; the previous version of the service stays in service");
            }
        }
        let ordered: Vec<ServiceSpec> = order.iter().filter_map(|name| next.remove(name)).collect();
        let (services, conflicts) = config::check_conflicts(ordered);
        rejected.extend(conflicts);
        self.accepted = services
            .iter()
            .map(|s| (s.name.clone(), s.clone()))
            .collect();
        (services, rejected)
    }
}

/// What says that a file did not change between two reads.
#[derive(Debug, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<std::time::SystemTime>,
    hash: u64,
}

fn read_file(path: &Path) -> std::io::Result<(Vec<u8>, Fingerprint)> {
    use std::hash::{Hash as _, Hasher as _};
    use std::io::Read as _;
    let mut file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    let fingerprint = Fingerprint {
        len: meta.len(),
        modified: meta.modified().ok(),
        hash: hasher.finish(),
    };
    Ok((bytes, fingerprint))
}
