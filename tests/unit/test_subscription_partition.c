/* test_subscription_partition.c - which partition an event of a durable
 * subscription belongs to on Redis (shared/subscription_partition.c):
 * crc32 (ISO-HDLC, zlib's) of the aggregateId text, mod partitions, as
 * docs/contract.md section 13 states, so another client can compute it. */
#include "core.h"
#include "test.h"

TEST(the_partition_is_crc32_of_the_id_mod_partitions) {
    /* crc32("123456789") = 0xCBF43926 = 3421780262, the check value of the CRC catalogue */
    CHECK(subscription_partition_of("123456789", 7) == (int)(3421780262u % 7));
    CHECK(subscription_partition_of("123456789", 64) == (int)(3421780262u % 64));
    /* crc32("11111111-1111-4111-8111-111111111111"), computed with zlib.crc32 */
    CHECK(subscription_partition_of("11111111-1111-4111-8111-111111111111", 4) == (int)(0x30c919c0u % 4));
}

TEST(one_partition_or_no_id_is_partition_zero) {
    CHECK(subscription_partition_of("123456789", 1) == 0);
    CHECK(subscription_partition_of(NULL, 4) == 0);
    CHECK(subscription_partition_of("", 4) == (int)(0u % 4));
}

TEST(ids_spread_over_every_partition) {
    int seen[8] = {0};
    char id[40];
    for (int i = 0; i < 800; i++) {
        snprintf(id, sizeof id, "00000000-0000-4000-8000-%012d", i);
        seen[subscription_partition_of(id, 8)]++;
    }
    for (int p = 0; p < 8; p++) CHECK(seen[p] > 50); /* about 100 each */
}

TEST_MAIN()
