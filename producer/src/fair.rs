//! Fair shares of the bulk lane: how many messages the splitter may publish for each of
//! its batches in one round, weighted per agency first, then per batch within an agency.
//!
//! Every message waits its turn in the same FIFO work queue, so an agency's share of the
//! workers is its share of the messages in flight (Little's law: equal time in the queue,
//! so throughput ∝ messages waiting). The splitter therefore keeps every agency at the same
//! number of bulk-lane messages in flight (`split.max_in_flight_per_agency`), tops every
//! agency up by at most one chunk (`split.chunk_size`) per round, and shares that among the
//! agency's batches, topping up the one with the fewest in flight first (water-filling),
//! each within its own window (`split.max_in_flight_per_batch`). An agency with five large
//! batches thus gets the same share as an agency with one, and its five batches a fifth
//! each, both when the windows are full (the workers are the bottleneck) and when they are
//! not (the splitter is: then what an agency gets is what it is published per round).
//!
//! Interactive-lane batches have a queue and worker capacity of their own and are tiny:
//! they only get their per-batch room, and never count against an agency's bulk share.
//!
//! The agency's messages in flight are read from every unfinished batch of the agency, not
//! only the ones this producer splits; two producers splitting batches of one agency may
//! both top it up in the same instant, so the share is a target, exceeded by at most one
//! chunk per producer.

use std::collections::HashMap;

use bulkops_shared::batch::Lane;

/// The windows and chunk size of a round.
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    /// Most messages read and published for one batch per round.
    pub chunk: i64,
    /// Most messages of one batch in flight (0: no limit).
    pub per_batch: i64,
    /// Most bulk-lane messages of one agency in flight (0: no limit).
    pub per_agency: i64,
}

/// A batch this producer splits, as the planner sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// Its agency.
    pub agency_id: i64,
    /// Its lane.
    pub lane: Lane,
    /// Its messages published and not yet decided.
    pub in_flight: i64,
    /// Items it has not published yet (an upper bound: some may be settled already).
    pub unpublished: i64,
}

/// How many messages each candidate may publish this round (same order as `batches`).
/// `agency_in_flight` is each agency's bulk-lane messages in flight over all its
/// unfinished batches (a missing agency counts as none).
pub fn plan(batches: &[Candidate], agency_in_flight: &HashMap<i64, i64>, w: Windows) -> Vec<i64> {
    let chunk = w.chunk.max(0);
    // The per-batch room: the window left, at most a chunk, at most what is unpublished.
    // A batch with nothing unpublished still gets a chunk's room when its window allows, so
    // that publishing finds the end of its items and marks its split done.
    let own_room = |b: &Candidate| -> i64 {
        if w.per_batch <= 0 {
            chunk
        } else {
            (w.per_batch - b.in_flight.max(0)).clamp(0, chunk)
        }
    };
    let mut rooms: Vec<i64> = batches.iter().map(own_room).collect();
    if w.per_agency <= 0 {
        return rooms;
    }
    let mut by_agency: HashMap<i64, Vec<usize>> = HashMap::new();
    for (i, b) in batches.iter().enumerate() {
        if b.lane == Lane::Bulk {
            by_agency.entry(b.agency_id).or_default().push(i);
        }
    }
    for (agency, members) in by_agency {
        let in_flight = agency_in_flight.get(&agency).copied().unwrap_or(0).max(0);
        // At most one chunk per agency per round, whatever its number of batches: when the
        // workers drain the queue faster than the splitter fills it (the windows are not
        // full), what each agency gets is what it is published per round.
        let share = (w.per_agency - in_flight).max(0).min(chunk);
        // A batch with nothing left to publish keeps a token room of 1 (outside the share:
        // it publishes nothing) so that its split can finish; the others share.
        let (finishing, sharing): (Vec<usize>, Vec<usize>) = members
            .into_iter()
            .partition(|&i| batches[i].unpublished <= 0);
        for i in finishing {
            rooms[i] = rooms[i].min(1);
        }
        let caps: Vec<i64> = sharing
            .iter()
            .map(|&i| rooms[i].min(batches[i].unpublished))
            .collect();
        let levels: Vec<i64> = sharing
            .iter()
            .map(|&i| batches[i].in_flight.max(0))
            .collect();
        let given = water_fill(&levels, &caps, share);
        for (k, &i) in sharing.iter().enumerate() {
            rooms[i] = given[k];
        }
    }
    rooms
}

/// Shares `total` among slots that already hold `levels`, each taking at most `caps`,
/// raising the lowest first: the result evens the slots out as far as `total` allows.
fn water_fill(levels: &[i64], caps: &[i64], total: i64) -> Vec<i64> {
    let n = levels.len();
    let mut given = vec![0_i64; n];
    if n == 0 || total <= 0 {
        return given;
    }
    let fill = |level: i64| -> i64 {
        levels
            .iter()
            .zip(caps)
            .map(|(&l, &c)| (level - l).clamp(0, c.max(0)))
            .fold(0_i64, i64::saturating_add)
    };
    let capacity: i64 = caps.iter().map(|c| (*c).max(0)).sum();
    if capacity <= total {
        return caps.iter().map(|c| (*c).max(0)).collect();
    }
    // The highest water level that does not use more than `total`.
    let (mut lo, mut hi) = (
        0_i64,
        levels.iter().max().copied().unwrap_or(0) + capacity + 1,
    );
    while lo + 1 < hi {
        let mid = lo + (hi - lo) / 2;
        if fill(mid) <= total {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let mut left = total;
    for i in 0..n {
        given[i] = (lo - levels[i]).clamp(0, caps[i].max(0));
        left -= given[i];
    }
    // What rounding left over goes one by one to the lowest slots that can take it.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (levels[i] + given[i], i));
    for i in order {
        if left == 0 {
            break;
        }
        if given[i] < caps[i] {
            given[i] += 1;
            left -= 1;
        }
    }
    given
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Windows = Windows {
        chunk: 2000,
        per_batch: 20_000,
        per_agency: 20_000,
    };

    fn bulk(agency_id: i64, in_flight: i64) -> Candidate {
        Candidate {
            agency_id,
            lane: Lane::Bulk,
            in_flight,
            unpublished: 1_000_000,
        }
    }

    fn in_flight_of(batches: &[Candidate]) -> HashMap<i64, i64> {
        let mut m = HashMap::new();
        for b in batches.iter().filter(|b| b.lane == Lane::Bulk) {
            *m.entry(b.agency_id).or_default() += b.in_flight;
        }
        m
    }

    /// Runs rounds in which every batch's messages are decided between rounds at the same
    /// rate per message in flight (a FIFO queue), and returns each agency's decided
    /// messages once the queue has filled (after `warm_up` rounds): the share of the
    /// workers it got.
    fn simulate(batches: &mut [Candidate], warm_up: usize, rounds: usize) -> HashMap<i64, i64> {
        let mut decided: HashMap<i64, i64> = HashMap::new();
        for round in 0..warm_up + rounds {
            let rooms = plan(batches, &in_flight_of(batches), W);
            for (b, r) in batches.iter_mut().zip(rooms) {
                b.in_flight += r;
                b.unpublished -= r;
            }
            // The workers decide 10 % of what is in flight, FIFO: the same share of every
            // batch's messages.
            for b in batches.iter_mut() {
                let done = b.in_flight / 10;
                b.in_flight -= done;
                if round >= warm_up {
                    *decided.entry(b.agency_id).or_default() += done;
                }
            }
        }
        decided
    }

    #[test]
    fn an_agency_with_four_batches_gets_the_share_of_an_agency_with_one() {
        let mut batches = vec![bulk(1, 0), bulk(1, 0), bulk(1, 0), bulk(1, 0), bulk(2, 0)];
        let decided = simulate(&mut batches, 50, 200);
        let (a, b) = (decided[&1] as f64, decided[&2] as f64);
        assert!(
            (a / (a + b) - 0.5).abs() < 0.01,
            "agency 1 {a}, agency 2 {b}"
        );
        // Within agency 1 the four batches hold the same number of messages.
        let flights: Vec<i64> = batches[..4].iter().map(|b| b.in_flight).collect();
        assert!(
            flights.iter().max().unwrap() - flights.iter().min().unwrap() <= 1,
            "{flights:?}"
        );
    }

    #[test]
    fn without_an_agency_window_batches_share_alone() {
        let w = Windows { per_agency: 0, ..W };
        let batches = vec![bulk(1, 0), bulk(1, 0), bulk(2, 0)];
        assert_eq!(
            plan(&batches, &in_flight_of(&batches), w),
            vec![2000, 2000, 2000]
        );
    }

    #[test]
    fn the_agency_window_counts_batches_this_producer_does_not_split() {
        let batches = vec![bulk(1, 0)];
        let mut elsewhere = HashMap::new();
        elsewhere.insert(1, 19_500);
        assert_eq!(plan(&batches, &elsewhere, W), vec![500]);
        elsewhere.insert(1, 25_000);
        assert_eq!(plan(&batches, &elsewhere, W), vec![0]);
    }

    #[test]
    fn the_emptiest_batch_of_an_agency_is_topped_up_first() {
        // 5,000 of the agency's 20,000 are free, one chunk (2,000) this round: it goes to
        // the emptiest batch.
        let batches = vec![bulk(1, 9_000), bulk(1, 6_000), bulk(1, 0)];
        assert_eq!(plan(&batches, &in_flight_of(&batches), W), vec![0, 0, 2000]);
        let batches = vec![bulk(1, 9_000), bulk(1, 1_500), bulk(1, 1_000)];
        assert_eq!(
            plan(&batches, &in_flight_of(&batches), W),
            vec![0, 750, 1250]
        );
        // Less than a chunk free: that much.
        let batches = vec![bulk(1, 9_000), bulk(1, 9_500), bulk(1, 1_000)];
        assert_eq!(plan(&batches, &in_flight_of(&batches), W), vec![0, 0, 500]);
    }

    #[test]
    fn every_agency_gets_one_chunk_a_round_however_many_batches_it_has() {
        let batches = vec![bulk(1, 0), bulk(1, 0), bulk(1, 0), bulk(1, 0), bulk(2, 0)];
        let rooms = plan(&batches, &in_flight_of(&batches), W);
        assert_eq!(rooms[..4].iter().sum::<i64>(), 2000, "{rooms:?}");
        assert_eq!(rooms[4], 2000);
        assert_eq!(rooms[..4], [500, 500, 500, 500]);
    }

    /// When the splitter is the bottleneck (the workers take everything published before
    /// the next round), each agency's share is what it is published per round.
    #[test]
    fn a_slow_splitter_still_gives_even_shares() {
        let mut batches = vec![bulk(1, 0), bulk(1, 0), bulk(1, 0), bulk(1, 0), bulk(2, 0)];
        let mut decided: HashMap<i64, i64> = HashMap::new();
        for _ in 0..100 {
            let rooms = plan(&batches, &in_flight_of(&batches), W);
            for (b, r) in batches.iter_mut().zip(rooms) {
                *decided.entry(b.agency_id).or_default() += r;
                b.unpublished -= r;
            }
        }
        assert_eq!(decided[&1], decided[&2]);
    }

    #[test]
    fn interactive_batches_ignore_the_agency_window() {
        let mut small = bulk(1, 0);
        small.lane = Lane::Interactive;
        small.unpublished = 1;
        let batches = vec![bulk(1, 0), small];
        let mut full = HashMap::new();
        full.insert(1, 20_000);
        assert_eq!(plan(&batches, &full, W), vec![0, 2000]);
    }

    #[test]
    fn a_batch_with_nothing_left_keeps_room_to_finish_its_split() {
        let mut done = bulk(1, 0);
        done.unpublished = 0;
        let batches = vec![done, bulk(1, 0)];
        let rooms = plan(&batches, &in_flight_of(&batches), W);
        assert_eq!(rooms[0], 1);
        assert_eq!(rooms[1], 2000);
    }

    #[test]
    fn water_fill_evens_out_and_respects_caps() {
        assert_eq!(water_fill(&[0, 0, 0], &[10, 10, 10], 9), vec![3, 3, 3]);
        assert_eq!(
            water_fill(&[0, 0, 0], &[10, 10, 10], 10)
                .iter()
                .sum::<i64>(),
            10
        );
        assert_eq!(water_fill(&[5, 0], &[10, 10], 5), vec![0, 5]);
        assert_eq!(water_fill(&[5, 0], &[10, 2], 5), vec![3, 2]);
        assert_eq!(water_fill(&[0, 0], &[1, 1], 100), vec![1, 1]);
        assert_eq!(water_fill(&[], &[], 100), Vec::<i64>::new());
        assert_eq!(water_fill(&[1, 2], &[5, 5], 0), vec![0, 0]);
    }
}
