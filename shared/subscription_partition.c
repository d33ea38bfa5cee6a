/* subscription_partition.c - which partition of a durable subscription an
 * event belongs to on Redis (docs/contract.md section 13): the CRC-32
 * (ISO-HDLC, as zlib's crc32) of its aggregateId's text, modulo the
 * partitions. Pure. RabbitMQ needs none of this: its consistent-hash exchange
 * picks the partition from the event's x-conveyor-aggregate header. */
#include "core.h"

#include <string.h>

/* The CRC-32 of n bytes (reflected polynomial 0xEDB88320), bit by bit: an
 * aggregate id is 36 bytes, a table would buy nothing measurable. */
static uint32_t crc32_of(const unsigned char *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
    }
    return ~c;
}

int subscription_partition_of(const char *aggregate_id, int partitions) {
    if (partitions <= 1 || !aggregate_id) return 0;
    return (int)(crc32_of((const unsigned char *)aggregate_id, strlen(aggregate_id)) % (uint32_t)partitions);
}
