//! Per-voxel work (resampling, normalisation) split over the machine's cores with
//! `std::thread::scope`, giving the same bits whatever the number of threads: every output
//! element is computed by the same expression on one thread, and sums are taken over fixed
//! blocks of [`BLOCK`] elements whose partial sums are then added in block order.

/// Elements per block of a reduction: the partial sums do not depend on the thread count.
pub const BLOCK: usize = 1 << 16;

/// The threads to use: the cores this process may run on (`available_parallelism`), at least 1.
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Calls `f(first, part)` on consecutive parts of `data` (each a whole number of `unit` elements
/// but the last, `first` its index in `data`), on at most `threads` threads: the caller's and
/// scoped ones.
pub fn for_each_chunk<T: Send>(data: &mut [T], unit: usize, threads: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let unit = unit.max(1);
    let units = data.len().div_ceil(unit);
    let threads = threads.clamp(1, units.max(1));
    if threads == 1 {
        f(0, data);
        return;
    }
    let per = units.div_ceil(threads) * unit;
    std::thread::scope(|s| {
        let mut parts = data.chunks_mut(per).enumerate();
        // The first part on this thread, the others on threads of their own.
        let first = parts.next();
        for (k, part) in parts {
            let f = &f;
            s.spawn(move || f(k * per, part));
        }
        if let Some((_, part)) = first {
            f(0, part);
        }
    });
}

/// `f` of every block of [`BLOCK`] elements of `data`, in block order, computed on at most
/// `threads` threads.
pub fn per_block<T: Sync, R: Send + Clone + Default>(
    data: &[T],
    threads: usize,
    f: impl Fn(&[T]) -> R + Sync,
) -> Vec<R> {
    let blocks: Vec<&[T]> = data.chunks(BLOCK).collect();
    let mut out = vec![R::default(); blocks.len()];
    for_each_chunk(&mut out, 1, threads, |first, part| {
        for (i, r) in part.iter_mut().enumerate() {
            *r = f(blocks[first + i]);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_data_once_in_whole_units() {
        for threads in [1, 2, 3, 7, 64] {
            let mut v = vec![0usize; 10 * 7 + 3];
            for_each_chunk(&mut v, 7, threads, |first, part| {
                assert!(first % 7 == 0, "a part starts inside a unit");
                for (i, x) in part.iter_mut().enumerate() {
                    *x += first + i + 1;
                }
            });
            assert_eq!(v, (1..=73).collect::<Vec<_>>(), "{threads} threads");
        }
        let mut empty: Vec<u8> = Vec::new();
        for_each_chunk(&mut empty, 4, 4, |_, p| assert!(p.is_empty()));
    }

    #[test]
    fn block_sums_do_not_depend_on_the_threads() {
        let data: Vec<f32> = (0..3 * BLOCK + 17).map(|i| ((i * 7919) % 1000) as f32 * 0.001 + 1e-3).collect();
        let sum = |t| per_block(&data, t, |b| b.iter().map(|&x| x as f64).sum::<f64>());
        let one = sum(1);
        assert_eq!(one.len(), 4);
        for t in [2, 3, 8] {
            assert_eq!(sum(t), one, "{t} threads");
        }
    }
}
