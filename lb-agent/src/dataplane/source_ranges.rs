//! The source-range map (`SRC_RANGES_V1`, an LPM trie): one key per (service, prefix).
//! The data path asks it with the client's whole address; any range of the service that
//! holds the address matches.

use std::net::IpAddr;

use aya::maps::{MapData, MapError, lpm_trie::Key, lpm_trie::LpmTrie};
use ipnet::IpNet;
use lb_common::{FAMILY_V6, SOURCE_RANGE_FIXED_BITS, SourceRangeKey, addr_key, maps};

use super::{Dataplane, DataplaneError};

/// The trie key of `range` (host bits cleared) for `service_id`.
pub fn range_key(service_id: u32, range: IpNet) -> Key<SourceRangeKey> {
    let range = range.trunc();
    let (addr, family) = addr_key(range.network());
    Key::new(
        SOURCE_RANGE_FIXED_BITS + u32::from(range.prefix_len()),
        SourceRangeKey::new(service_id, family, addr),
    )
}

/// The service and range a trie key stands for; `None` for bytes no agent writes.
pub fn key_range(key: &Key<SourceRangeKey>) -> Option<(u32, IpNet)> {
    let data = key.data();
    let bits = u8::try_from(key.prefix_len().checked_sub(SOURCE_RANGE_FIXED_BITS)?).ok()?;
    let addr = if data.family == FAMILY_V6 {
        IpAddr::from(data.addr)
    } else {
        IpAddr::from([data.addr[0], data.addr[1], data.addr[2], data.addr[3]])
    };
    let range = IpNet::new(addr, bits).ok()?;
    Some((u32::from_be_bytes(data.service_id), range))
}

fn map_err(source: MapError) -> DataplaneError {
    DataplaneError::Map {
        name: maps::SOURCE_RANGES,
        source,
    }
}

impl Dataplane {
    fn source_ranges_mut(
        &mut self,
    ) -> Result<LpmTrie<&mut MapData, SourceRangeKey, u32>, DataplaneError> {
        LpmTrie::try_from(self.map_mut(maps::SOURCE_RANGES)?).map_err(map_err)
    }

    /// Admits clients in `range` to new flows of `service_id`'s frontends (those that
    /// carry `FRONTEND_F_SOURCE_RANGES`).
    pub fn add_source_range(
        &mut self,
        service_id: u32,
        range: IpNet,
    ) -> Result<(), DataplaneError> {
        self.source_ranges_mut()?
            .insert(&range_key(service_id, range), 1, 0)
            .map_err(map_err)
    }

    /// Removes a range; a missing one is success.
    pub fn remove_source_range(
        &mut self,
        service_id: u32,
        range: IpNet,
    ) -> Result<(), DataplaneError> {
        let mut m = self.source_ranges_mut()?;
        super::maps::absent_ok(m.remove(&range_key(service_id, range))).map_err(map_err)
    }

    /// Every range in the map, by service id (sorted).
    pub fn source_ranges(&self) -> Result<Vec<(u32, IpNet)>, DataplaneError> {
        let m: LpmTrie<_, SourceRangeKey, u32> =
            LpmTrie::try_from(self.map(maps::SOURCE_RANGES)?).map_err(map_err)?;
        let mut ranges = Vec::new();
        for key in m.keys() {
            let key = key.map_err(map_err)?;
            if let Some(range) = key_range(&key) {
                ranges.push(range);
            } else {
                tracing::warn!(
                    prefix_len = key.prefix_len(),
                    "ignoring a source range key no agent writes"
                );
            }
        }
        ranges.sort();
        Ok(ranges)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_clear_host_bits() {
        for (text, service) in [
            ("198.51.100.0/24", 1),
            ("198.51.100.7/32", 65_535),
            ("0.0.0.0/0", 7),
            ("2001:db8:c::/48", 300),
            ("::/0", 2),
        ] {
            let range: IpNet = text.parse().unwrap();
            assert_eq!(
                key_range(&range_key(service, range)),
                Some((service, range))
            );
        }
        let sloppy: IpNet = "198.51.100.9/24".parse().unwrap();
        let key = range_key(3, sloppy);
        assert_eq!(key.data().addr[..4], [198, 51, 100, 0]);
        assert_eq!(key.prefix_len(), 64 + 24);
        assert_eq!(
            key.data().service_id,
            [0, 0, 0, 3],
            "big-endian: compared first"
        );
    }
}
