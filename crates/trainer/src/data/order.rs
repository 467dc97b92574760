//! Seeded orders: the shuffle of each epoch and the split of a single file.
//!
//! ChaCha is specified bit for bit, so an order depends on the seed alone: not on the thread
//! count, the platform or the version of the `rand` crate's default generator.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// The order in which epoch `epoch` visits `len` samples, for `seed`.
pub fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    order.shuffle(&mut rng);
    order
}

/// Splits `len` rows into (train, test) with `fraction` of them, rounded, held out for test.
pub fn split_rows(len: usize, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let test_len = ((len as f64) * fraction).round() as usize;
    let test = order.split_off(len - test_len.min(len));
    (order, test)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_orders_are_permutations_fixed_by_seed_and_epoch() {
        let a = epoch_order(100, 7, 0);
        assert_eq!(a, epoch_order(100, 7, 0));
        assert_ne!(a, epoch_order(100, 7, 1));
        assert_ne!(a, epoch_order(100, 8, 0));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn split_holds_out_the_fraction_without_overlap() {
        let (train, test) = split_rows(10, 0.3, 1);
        assert_eq!((train.len(), test.len()), (7, 3));
        assert!(test.iter().all(|t| !train.contains(t)));
    }
}
