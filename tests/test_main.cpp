// The one translation unit that holds the implementation; the other test files include only the
// declarations, so linking them together proves the header works in several TUs.
#define MOE_INFER_IMPLEMENTATION
#include "moe_infer.h"

#include <gtest/gtest.h>

int main(int argc, char** argv) {
    ::testing::InitGoogleTest(&argc, argv);
    return RUN_ALL_TESTS();
}

// ---- thread pool internals (moe::detail is visible only in this translation unit) ----

#include <atomic>
#include <vector>

namespace {

// Guided chunks hand out every item of [0, total) exactly once per phase, whatever the thread
// count, chunk floor and total; the barrier resets the counter between phases.
TEST(ThreadPool, GuidedChunksCoverEveryItemOnce) {
    const int64_t totals[] = {1, 2, 7, 64, 1000, 12345};
    for (int threads : {1, 3, 8}) {
        moe::detail::ThreadPool pool(threads);
        std::vector<std::atomic<int>> seen(12345 * 6);
        for (auto& s : seen) s.store(0);
        pool.parallel_for([&](int ith, int nth) {
            for (int phase = 0; phase < 6; ++phase) {
                const int64_t total = totals[phase];
                int64_t begin, end;
                while (pool.grab_guided(total, 1 + phase % 3, nth, &begin, &end))
                    for (int64_t i = begin; i < end; ++i) seen[(size_t)(phase * 12345 + i)].fetch_add(1);
                pool.barrier(ith, nth);
            }
        });
        for (int phase = 0; phase < 6; ++phase)
            for (int64_t i = 0; i < 12345; ++i)
                ASSERT_EQ(seen[(size_t)(phase * 12345 + i)].load(), i < totals[phase] ? 1 : 0)
                    << threads << " threads, phase " << phase << ", item " << i;
    }
}

// No thread leaves a barrier before every thread has arrived: each writes its phase number, and
// after the barrier every slot must show that phase. Exactly one DoneCounter caller sees the total.
TEST(ThreadPool, BarrierSeparatesPhasesAndOneThreadFinishes) {
    for (int threads : {2, 5, 9}) {
        moe::detail::ThreadPool pool(threads);
        std::vector<std::atomic<int>> slot((size_t)threads);
        std::atomic<int> errors{0}, finishers{0};
        moe::detail::DoneCounter done;
        const int kPhases = 200;
        for (int call = 0; call < 3; ++call) {  // several runs: workers spin or sleep in between
            pool.parallel_for([&](int ith, int nth) {
                for (int phase = 0; phase < kPhases; ++phase) {
                    slot[(size_t)ith].store(phase, std::memory_order_relaxed);
                    if (done.finish(ith + 1, (int64_t)nth * (nth + 1) / 2)) finishers.fetch_add(1);
                    pool.barrier(ith, nth);
                    for (int j = 0; j < nth; ++j)
                        if (slot[(size_t)j].load(std::memory_order_relaxed) != phase) errors.fetch_add(1);
                    pool.barrier(ith, nth);
                }
            });
        }
        EXPECT_EQ(errors.load(), 0) << threads << " threads";
        EXPECT_EQ(finishers.load(), 3 * kPhases) << threads << " threads";
    }
}

}  // namespace
