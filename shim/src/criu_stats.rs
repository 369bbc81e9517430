//! CRIU's `stats-dump` / `stats-restore` images: decoded without trusting them (the guest wrote them).
//!
//! An image is two 32-bit magics, then one entry: a 32-bit little-endian length and a protobuf
//! `StatsEntry { dump_stats_entry dump = 1; restore_stats_entry restore = 2; }` whose fields are all
//! varints (CRIU's images/stats.proto). Times are in microseconds.
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("{0}: not a CRIU stats image ({1})")]
    Format(String, &'static str),
}

const DUMP_FIELDS: &[(u32, &str)] = &[
    (1, "freezing_time_us"),
    (2, "frozen_time_us"),
    (3, "memdump_time_us"),
    (4, "memwrite_time_us"),
    (5, "pages_scanned"),
    (6, "pages_skipped_parent"),
    (7, "pages_written"),
    (8, "irmap_resolve_us"),
    (9, "pages_lazy"),
    (10, "page_pipes"),
    (11, "page_pipe_bufs"),
    (12, "shpages_scanned"),
    (13, "shpages_skipped_parent"),
    (14, "shpages_written"),
];
const RESTORE_FIELDS: &[(u32, &str)] =
    &[(1, "pages_compared"), (2, "pages_skipped_cow"), (3, "forking_time_us"), (4, "restore_time_us"), (5, "pages_restored")];

fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i)?;
        *i += 1;
        v |= ((byte & 0x7f) as u64) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Decodes a protobuf message of varint fields; nested messages (wire type 2) are returned raw.
fn fields(b: &[u8]) -> Option<(Vec<(u32, u64)>, Vec<(u32, &[u8])>)> {
    let (mut ints, mut msgs, mut i) = (vec![], vec![], 0);
    while i < b.len() {
        let key = varint(b, &mut i)?;
        let (field, wire) = ((key >> 3) as u32, key & 7);
        match wire {
            0 => ints.push((field, varint(b, &mut i)?)),
            2 => {
                let len = varint(b, &mut i)? as usize;
                let end = i.checked_add(len).filter(|e| *e <= b.len())?;
                msgs.push((field, &b[i..end]));
                i = end;
            }
            _ => return None,
        }
    }
    Some((ints, msgs))
}

/// Decodes the bytes of a stats image into named figures ("dump.pages_written" → 65536, ...).
pub fn decode(name: &str, data: &[u8]) -> Result<BTreeMap<String, u64>, StatsError> {
    let bad = |why| StatsError::Format(name.to_string(), why);
    if data.len() < 12 {
        return Err(bad("too short"));
    }
    let len = u32::from_le_bytes(data[8..12].try_into().unwrap()) as usize;
    let body = data.get(12..12 + len).ok_or_else(|| bad("entry longer than the file"))?;
    let (_, msgs) = fields(body).ok_or_else(|| bad("bad protobuf"))?;
    let mut out = BTreeMap::new();
    for (field, msg) in msgs {
        let (prefix, names) = match field {
            1 => ("dump", DUMP_FIELDS),
            2 => ("restore", RESTORE_FIELDS),
            _ => continue,
        };
        let (ints, _) = fields(msg).ok_or_else(|| bad("bad protobuf in entry"))?;
        for (f, v) in ints {
            if let Some((_, n)) = names.iter().find(|(k, _)| *k == f) {
                out.insert(format!("{prefix}.{n}"), v);
            }
        }
    }
    if out.is_empty() {
        return Err(bad("no dump or restore figures"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(entry: &[u8]) -> Vec<u8> {
        let mut v = vec![0x40, 0x59, 0x10, 0x55, 0x06, 0x33, 0x09, 0x57];
        v.extend_from_slice(&(entry.len() as u32).to_le_bytes());
        v.extend_from_slice(entry);
        v
    }

    #[test]
    fn decodes_dump_figures() {
        // dump { freezing_time=1000, frozen_time=300000 (varint e0 a7 12), pages_written=65536 (80 80 04) }
        let dump = [0x08, 0xe8, 0x07, 0x10, 0xe0, 0xa7, 0x12, 0x38, 0x80, 0x80, 0x04];
        let mut entry = vec![0x0a, dump.len() as u8];
        entry.extend_from_slice(&dump);
        let m = decode("stats-dump", &image(&entry)).unwrap();
        assert_eq!(m["dump.freezing_time_us"], 1000);
        assert_eq!(m["dump.frozen_time_us"], 300000);
        assert_eq!(m["dump.pages_written"], 65536);
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert!(decode("x", b"short").is_err());
        assert!(decode("x", &image(&[0x0a, 0x7f, 0x08])).is_err(), "nested length past the end");
        let mut huge = image(&[]);
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode("x", &huge).is_err());
        assert!(decode("x", &image(&[0x0b])).is_err(), "unknown wire type");
        for n in 0..64u8 {
            let _ = decode("x", &image(&vec![0xff; n as usize]));
        }
    }
}
