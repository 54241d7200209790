// The one translation unit that holds the implementation; the other test files include only the
// declarations, so linking them together proves the header works in several TUs.
#define MOE_INFER_IMPLEMENTATION
#include "moe_infer.h"

#include <gtest/gtest.h>

int main(int argc, char** argv) {
    ::testing::InitGoogleTest(&argc, argv);
    return RUN_ALL_TESTS();
}
