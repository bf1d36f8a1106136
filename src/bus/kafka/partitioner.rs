//! Key → partition placement: what Kafka's Java default partitioner picks
//! for a keyed record, computed here so the sink knows where every journal
//! entry went without asking the broker, and readers know where a domain's
//! messages are.
//!
//! Invariant: a domain's messages always go to partition
//! `murmur2(uuid) mod partitions`; this must match Kafka's own
//! `Utils.murmur2` bit for bit.

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of a message key: what Kafka's Java default partitioner
/// picks for a keyed record.
pub fn partition_for(key: &str, partitions: i32) -> i32 {
    (murmur2(key.as_bytes()) & 0x7fff_ffff) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka() {
        // Values from Apache Kafka's own tests of Utils.murmur2.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (k, want) in cases {
            assert_eq!(murmur2(k), want, "{}", String::from_utf8_lossy(k));
        }
    }

    #[test]
    fn partitions_are_in_range_and_stable() {
        let key = "b9906489-6d5b-40f8-a742-ca71b2b84277";
        for n in 1..=64 {
            let p = partition_for(key, n);
            assert!((0..n).contains(&p));
            assert_eq!(p, partition_for(key, n));
        }
        // 1,000 random keys spread over every one of 12 partitions.
        let mut seen = [0u32; 12];
        for _ in 0..1000 {
            let k = uuid::Uuid::new_v4().to_string();
            seen[partition_for(&k, 12) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 30), "{seen:?}");
    }
}
