//! Smooth weighted round robin (as in nginx): a backend of weight w gets w turns in every ΣW,
//! spread out rather than in bursts.

/// Length of one cycle: ΣW divided by the greatest common divisor of the non-zero weights.
pub fn sequence_len(weights: &[u32]) -> u64 {
    let g = weights
        .iter()
        .filter(|w| **w > 0)
        .fold(0u64, |g, w| gcd(g, *w as u64));
    if g == 0 {
        return 0;
    }
    weights.iter().map(|w| *w as u64 / g).sum()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// One cycle of the smooth weighted round-robin order over (value, weight) pairs, in the order
/// given (ties go to the earlier one). Weights are divided by their gcd first.
pub fn smooth_wrr<T: Copy>(items: &[(T, u32)]) -> Vec<T> {
    let g = items
        .iter()
        .filter(|(_, w)| *w > 0)
        .fold(0u64, |g, (_, w)| gcd(g, *w as u64));
    if g == 0 {
        return Vec::new();
    }
    let w: Vec<i64> = items.iter().map(|(_, w)| (*w as u64 / g) as i64).collect();
    let total: i64 = w.iter().sum();
    let mut current = vec![0i64; items.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = usize::MAX;
        for i in 0..items.len() {
            if w[i] == 0 {
                continue;
            }
            current[i] += w[i];
            if best == usize::MAX || current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(items[best].0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_order_matches_nginx() {
        // nginx's documented example: weights 5, 1, 1 → a a b a c a a.
        let seq = smooth_wrr(&[('a', 5), ('b', 1), ('c', 1)]);
        assert_eq!(seq.iter().collect::<String>(), "aabacaa");
        assert_eq!(
            smooth_wrr(&[('x', 3), ('y', 0), ('z', 3)])
                .iter()
                .collect::<String>(),
            "xz"
        );
        assert_eq!(sequence_len(&[2, 4, 6]), 6);
        assert!(smooth_wrr::<u8>(&[]).is_empty());
    }

    #[test]
    fn every_backend_gets_its_weight_per_cycle_interleaved() {
        let items: Vec<(u32, u32)> = vec![(0, 1), (1, 2), (2, 3), (3, 2)];
        let seq = smooth_wrr(&items);
        assert_eq!(seq.len(), 8);
        for (id, w) in &items {
            assert_eq!(seq.iter().filter(|x| *x == id).count(), *w as usize);
        }
        // Not in bursts: the heaviest never runs more than twice in a row here.
        assert!(seq.windows(3).all(|w| !(w[0] == w[1] && w[1] == w[2])));
    }
}
