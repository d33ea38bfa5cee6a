/* redis_scripts.c - the Lua scripts of the Redis backend, which broker_redis.c
 * runs with EVAL: each moves messages between keys in one step on the server
 * (a script runs whole, nothing in between). Constants only: nothing here
 * calls anything. Declared in redis_internal.h. */
#include "redis_internal.h"

/* Returns an in-flight list (KEYS[1]) to the consuming end of its queue
 * (KEYS[2]), oldest first, marking each message returned (KEYS[3]); with
 * KEYS[4], only if that worker's liveness key has expired. Returns how many. */
const char redis_script_return[] =
    "if KEYS[4] and redis.call('EXISTS', KEYS[4]) == 1 then return 0 end "
    "local n = 0 "
    "while true do "
    "local v = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT') "
    "if not v then return n end "
    "redis.call('SADD', KEYS[3], v) n = n + 1 end";

/* Removes the acked messages ARGV[3..] from the in-flight list, then moves up
 * to ARGV[1] waiting messages to it, but no more than a fair share of those
 * waiting (their number divided by ARGV[2], the queue's workers, rounded up:
 * a backlog spreads over the workers), oldest first, and returns them, each
 * followed by 1 if it had been returned (KEYS[3]) or 0: one round trip and
 * one AOF write for the ack of a batch and the take of the next. */
const char redis_script_take[] =
    "for i = 3, #ARGV do redis.call('LREM', KEYS[2], 1, ARGV[i]) end "
    "local m = {} "
    "local marked = redis.call('EXISTS', KEYS[3]) == 1 "
    "local want = math.min(tonumber(ARGV[1]), math.ceil(redis.call('LLEN', KEYS[1]) / tonumber(ARGV[2]))) "
    "for i = 1, want do "
    "local v = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT') "
    "if not v then break end "
    "m[#m + 1] = v "
    "m[#m + 1] = marked and redis.call('SREM', KEYS[3], v) or 0 end "
    "return m";

/* Runs `<cmd[i]> KEYS[i] [1] ARGV[i]` for each i in order (LREM removes one
 * occurrence), stopping at the first that Redis refuses, in one script: a
 * message is copied to where it goes before it is removed from where it was,
 * so a refusal (a key of the wrong type, out of memory) never loses it. */
const char redis_script_moves[] =
    "for i = 1, #KEYS do "
    "local c = ARGV[2 * i - 1] "
    "if c == 'LREM' then redis.call(c, KEYS[i], 1, ARGV[2 * i]) else redis.call(c, KEYS[i], ARGV[2 * i]) end "
    "end return #KEYS";

/* ZADD KEYS[1] ARGV[1] ARGV[2], then LREM KEYS[2] 1 ARGV[2]. */
const char redis_script_retry[] =
    "redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2]) redis.call('LREM', KEYS[2], 1, ARGV[2]) return 1";

/* Moves due retries (score <= now) back to the producer end of the queue, marked returned. */
const char redis_script_due[] =
    "local m = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 500) "
    "for _, v in ipairs(m) do redis.call('LPUSH', KEYS[2], v) redis.call('ZREM', KEYS[1], v) "
    "redis.call('SADD', KEYS[3], v) end "
    "return #m";

/* A bounded queue's LPUSH (max_length): pushes ARGV[2] to KEYS[1] unless the
 * list holds ARGV[1] or more already; returns its new length, or -1 when full
 * (nothing pushed). Only Conveyor's producers and the timekeeper use it: a
 * foreign LPUSH, and Conveyor's own moves back (retries, a dead worker's
 * messages, requeues), are never refused and may go over the limit. */
const char redis_script_bounded_push[] =
    "if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[1]) then return -1 end "
    "return redis.call('LPUSH', KEYS[1], ARGV[2])";
