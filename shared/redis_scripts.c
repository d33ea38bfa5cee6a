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

/* ---- laned queues (q->lanes >= 2; docs/contract.md, "Lanes") ----------------
 * The pieces the laned scripts share, pasted in front of each (a script holds
 * no state between runs). The lanes are lists <lane prefix><class>:<i> (class
 * high, normal or low, i from 0 to N - 1), written out whole by the scripts
 * from a prefix in ARGV (a single Redis, not a cluster: a script may name keys
 * of its own). ROUTE is the type -> aggregate field map, given in ARGV as a
 * count and that many (type, field) pairs from index at.
 *
 * lane_of(v, n, fields) is lane_route (lane.c) in Lua: the class from
 * `priority` (anything but "high" or "low": normal), the key from
 * fairnessKey, orderingKey, the payload's aggregate field of its type, the id
 * (a non-empty string as it is, an integral number in decimal), else ""; a
 * body that is not JSON goes to normal with key "". The lane: the first 8 hex
 * digits of the key's SHA-1, as a number, modulo n. (A key over 255 bytes is
 * hashed whole here, where lane_route keeps its BLAKE2b: the same key still
 * gets the same lane, as only the scripts place commands in Redis lanes.)
 *
 * lane_release(inflight, owned, me): when the in-flight list is empty, frees
 * the lane owner keys named in the set owned that still hold me, and the set. */
#define LANE_LUA                                                                                     \
    "local function lane_fields(at) local f = {} "                                                    \
    "for i = 0, tonumber(ARGV[at]) - 1 do f[ARGV[at + 1 + 2 * i]] = ARGV[at + 2 + 2 * i] end "       \
    "return f, at + 1 + 2 * tonumber(ARGV[at]) end "                                                  \
    "local function lane_text(x) "                                                                    \
    "if type(x) == 'string' then if x ~= '' then return x end return nil end "                       \
    "if type(x) == 'number' and x == math.floor(x) and x > -9.2e18 and x < 9.2e18 then "             \
    "if x == 0 then return '0' end return string.format('%.0f', x) end "                             \
    "return nil end "                                                                                 \
    "local function lane_of(v, n, fields) "                                                           \
    "local ok, o = pcall(cjson.decode, v) "                                                           \
    "local c, key = 'normal', nil "                                                                   \
    "if ok and type(o) == 'table' then "                                                              \
    "if o.priority == 'high' or o.priority == 'low' then c = o.priority end "                         \
    "key = lane_text(o.fairnessKey) or lane_text(o.orderingKey) "                                     \
    "if not key and type(o.payload) == 'table' and type(o.type) == 'string' and fields[o.type] then " \
    "key = lane_text(o.payload[fields[o.type]]) end "                                                 \
    "key = key or lane_text(o.id) end "                                                               \
    "return c, tonumber(string.sub(redis.sha1hex(key or ''), 1, 8), 16) % n end "                     \
    "local function lane_release(inflight, owned, me) "                                               \
    "if redis.call('LLEN', inflight) > 0 then return 0 end "                                          \
    "local n = 0 "                                                                                    \
    "for _, k in ipairs(redis.call('SMEMBERS', owned)) do "                                           \
    "if redis.call('GET', k) == me then redis.call('DEL', k) n = n + 1 end end "                      \
    "redis.call('DEL', owned) return n end "

/* The take of a laned queue. KEYS: 1 the intake (the queue's list), 2 the
 * in-flight list, 3 the returned set, 4 the worker's owned set. ARGV: 1 max,
 * 2 the queue's workers, 3 N, 4-6 the classes in the order to look at them,
 * 7 the first lane (the cursor), 8 the lane prefix, 9 the owner prefix ('':
 * not ordered), 10 the worker id, 11 how many to sort at most, 12.. ROUTE,
 * then the acked messages. In order: the acks removed from flight; ordered,
 * the worker's lanes freed if nothing is left in flight; up to ARGV[11]
 * messages moved from the intake (oldest first) to the producer end of their
 * lanes; then the lanes that can be taken from (not empty; ordered: not owned
 * by another worker) counted, and up to ARGV[1] taken, but no more than a fair
 * share of what they hold (divided by the workers, rounded up): class by
 * class, round-robin over a class's lanes from the cursor, one message per
 * lane per round, each lane's oldest first; ordered, each lane taken from is
 * owned (its owner key set to the worker id, and named in the owned set), and
 * a worker takes from no more lanes than a fair share of those open to it
 * (their number divided by the workers, rounded up; the lanes it owns
 * already are always open), so that the other workers find lanes to take.
 * Returns the messages as redis_script_take does: each followed by 1 if it
 * had been returned (KEYS[3]), else 0. */
const char redis_script_lane_take[] = LANE_LUA
    "local n, me, op = tonumber(ARGV[3]), ARGV[10], ARGV[9] "
    "local fields, acks = lane_fields(12) "
    "for i = acks, #ARGV do redis.call('LREM', KEYS[2], 1, ARGV[i]) end "
    "if op ~= '' then lane_release(KEYS[2], KEYS[4], me) end "
    "for i = 1, tonumber(ARGV[11]) do "
    "local v = redis.call('RPOP', KEYS[1]) "
    "if not v then break end "
    "local c, l = lane_of(v, n, fields) "
    "redis.call('LPUSH', ARGV[8] .. c .. ':' .. l, v) end "
    "local open, waiting, nopen, mine = {}, 0, 0, 0 "
    "for ci = 4, 6 do "
    "local ls = {} "
    "for j = 0, n - 1 do "
    "local name = ARGV[ci] .. ':' .. ((tonumber(ARGV[7]) + j) % n) "
    "local len, o = redis.call('LLEN', ARGV[8] .. name), false "
    "if len > 0 and op ~= '' then o = redis.call('GET', op .. name) if o and o ~= me then len = 0 end end "
    "if len > 0 then "
    "ls[#ls + 1] = {ARGV[8] .. name, name, len, o == me} "
    "waiting, nopen = waiting + len, nopen + 1 "
    "if o == me then mine = mine + 1 end end end "
    "open[#open + 1] = ls end "
    "local want = math.min(tonumber(ARGV[1]), math.ceil(waiting / tonumber(ARGV[2]))) "
    "local lanes = op ~= '' and math.ceil(nopen / tonumber(ARGV[2])) or nopen "
    "local m, got = {}, 0 "
    "local marked = redis.call('EXISTS', KEYS[3]) == 1 "
    "for _, ls in ipairs(open) do "
    "local more = true "
    "while got < want and more do "
    "more = false "
    "for _, e in ipairs(ls) do "
    "if got < want and e[3] > 0 and (e[4] or mine < lanes) then "
    "local v = redis.call('LMOVE', e[1], KEYS[2], 'RIGHT', 'LEFT') "
    "e[3] = e[3] - 1 "
    "if v then "
    "more, got = true, got + 1 "
    "m[#m + 1] = v "
    "m[#m + 1] = marked and redis.call('SREM', KEYS[3], v) or 0 "
    "if op ~= '' and not e[4] then "
    "e[4], mine = true, mine + 1 redis.call('SET', op .. e[2], me) redis.call('SADD', KEYS[4], op .. e[2]) end "
    "end end end end end "
    "return m";

/* A laned queue's in-flight list back to its lanes. KEYS: 1 the in-flight
 * list, 2 the returned set, 3 the worker's owned set, 4 (optional) the
 * worker's liveness key: then only if it has expired. ARGV: 1 N, 2 the lane
 * prefix, 3 the owner prefix ('': not ordered), 4 the worker id, 5.. ROUTE.
 * Each message goes to the consuming (right) end of its lane, marked
 * returned, newest first, so that their order stays (the oldest ends up
 * rightmost, taken first); then, ordered, the worker's lanes are freed (those
 * still its). Returns how many messages moved. */
const char redis_script_lane_return[] = LANE_LUA
    "if KEYS[4] and redis.call('EXISTS', KEYS[4]) == 1 then return 0 end "
    "local n = tonumber(ARGV[1]) "
    "local fields = lane_fields(5) "
    "local k = 0 "
    "while true do "
    "local v = redis.call('LPOP', KEYS[1]) "
    "if not v then break end "
    "local c, l = lane_of(v, n, fields) "
    "redis.call('RPUSH', ARGV[2] .. c .. ':' .. l, v) "
    "redis.call('SADD', KEYS[2], v) k = k + 1 end "
    "if ARGV[3] ~= '' then lane_release(KEYS[1], KEYS[3], ARGV[4]) end "
    "return k";

/* One laned message out of flight back to the consuming end of its lane
 * (requeue, release). KEYS: 1 the in-flight list, 2 the returned set, 3 the
 * worker's owned set. ARGV: 1 the message, 2 '1' to mark it returned, 3 N,
 * 4 the lane prefix, 5 the owner prefix ('': not ordered), 6 the worker id,
 * 7 "lane=count,..." how many this worker put back to each lane since its
 * last take (its lane numbered class * N + i: high 0, normal 1, low 2), 8..
 * ROUTE. It goes in behind those (they are older: a worker hands back oldest
 * first), at the consuming end otherwise; then, ordered, the worker's lanes
 * are freed if nothing is left in flight. Returns the message's lane number
 * (class * N + i). */
const char redis_script_lane_back[] = LANE_LUA
    "local n = tonumber(ARGV[3]) "
    "local fields = lane_fields(8) "
    "local c, l = lane_of(ARGV[1], n, fields) "
    "local key = ARGV[4] .. c .. ':' .. l "
    "local idx = ({high = 0, normal = 1, low = 2})[c] * n + l "
    "local skip = 0 "
    "for a, b in string.gmatch(ARGV[7], '(%d+)=(%d+)') do if tonumber(a) == idx then skip = tonumber(b) end end "
    "skip = math.min(skip, redis.call('LLEN', key)) "
    "if ARGV[2] == '1' then redis.call('SADD', KEYS[2], ARGV[1]) end "
    "if skip == 0 then redis.call('RPUSH', key, ARGV[1]) "
    "else redis.call('LINSERT', key, 'BEFORE', redis.call('LINDEX', key, -skip), ARGV[1]) end "
    "redis.call('LREM', KEYS[1], 1, ARGV[1]) "
    "if ARGV[5] ~= '' then lane_release(KEYS[1], KEYS[3], ARGV[6]) end "
    "return idx";

/* An ordered laned queue's acks and settles: removes ARGV[2..] from the
 * in-flight list KEYS[1], then frees the worker's (ARGV[1]) lanes named in
 * its owned set KEYS[2] when nothing is left in flight. Returns how many
 * lanes it freed. */
const char redis_script_lane_release[] = LANE_LUA
    "for i = 2, #ARGV do redis.call('LREM', KEYS[1], 1, ARGV[i]) end "
    "return lane_release(KEYS[1], KEYS[2], ARGV[1])";

/* A laned queue's bounded LPUSH (max_length): as redis_script_bounded_push,
 * the waiting counted over the intake KEYS[1] and every lane (ARGV[3] the
 * lane prefix, ARGV[4] N). */
const char redis_script_lane_bounded_push[] =
    "local w = redis.call('LLEN', KEYS[1]) "
    "for _, c in ipairs({'high', 'normal', 'low'}) do for i = 0, tonumber(ARGV[4]) - 1 do "
    "w = w + redis.call('LLEN', ARGV[3] .. c .. ':' .. i) end end "
    "if w >= tonumber(ARGV[1]) then return -1 end "
    "return redis.call('LPUSH', KEYS[1], ARGV[2])";

/* Each lane's LLEN and its oldest message (LINDEX -1, or nil), class by
 * class (high, normal, low), lane by lane: ARGV[1] the lane prefix, ARGV[2] N. */
const char redis_script_lane_counts[] =
    "local m = {} "
    "for _, c in ipairs({'high', 'normal', 'low'}) do for i = 0, tonumber(ARGV[2]) - 1 do "
    "local k = ARGV[1] .. c .. ':' .. i "
    "m[#m + 1] = redis.call('LLEN', k) m[#m + 1] = redis.call('LINDEX', k, -1) end end "
    "return m";

/* Lanes a queue no longer has (its lanes lowered, or none now): every lane
 * <lane prefix ARGV[1]><class>:<i> with i from ARGV[2] (the lanes it has; 0
 * when it has none) up to ARGV[3] (LANES_MAX) emptied onto the consuming end
 * of the intake KEYS[1], each lane's oldest ending up rightmost (taken, or
 * sorted again, first). Returns how many moved. */
const char redis_script_lane_sweep[] =
    "local k = 0 "
    "for _, c in ipairs({'high', 'normal', 'low'}) do "
    "for i = tonumber(ARGV[2]), tonumber(ARGV[3]) - 1 do "
    "local key = ARGV[1] .. c .. ':' .. i "
    "while true do "
    "local v = redis.call('LPOP', key) "
    "if not v then break end "
    "redis.call('RPUSH', KEYS[1], v) k = k + 1 end end end "
    "return k";

/* A durable subscription's partition groups on the events stream (KEYS[1]),
 * ARGV[1] the group names' prefix ("sub:<name>:"), ARGV[2] the partitions:
 * each created unless it exists, all at the stream's last id, with their
 * entries-read set to the entries the stream was ever given, so that Redis
 * knows each group's lag from the start and a trim past entries a group has
 * not read shows as a lag above what the stream still holds (the gap,
 * docs/contract.md section 13). A missing stream is created empty. Returns
 * the groups it created. */
const char redis_script_subscription_groups[] =
    "local last, added = '0-0', 0 "
    "if redis.call('EXISTS', KEYS[1]) == 1 then "
    "  local info = redis.call('XINFO', 'STREAM', KEYS[1]) "
    "  for i = 1, #info, 2 do "
    "    if info[i] == 'last-generated-id' then last = info[i + 1] end "
    "    if info[i] == 'entries-added' then added = info[i + 1] end "
    "  end "
    "end "
    "local made = 0 "
    "for i = 0, tonumber(ARGV[2]) - 1 do "
    "  local ok = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1] .. i, last, 'MKSTREAM', 'ENTRIESREAD', added) "
    "  if type(ok) == 'table' and ok.err then "
    "    if not string.find(ok.err, 'BUSYGROUP') then return ok end "
    "  else made = made + 1 end "
    "end "
    "return made";

/* After a gap (section 13): group ARGV[1] of the stream KEYS[1], when it has
 * read the stream's last entry, gets its entries-read set to the entries the
 * stream was ever given, so that its lag counts no trimmed entry again.
 * Returns 1 when it set it, 0 when the group is not caught up. */
const char redis_script_subscription_resync[] =
    "local info = redis.call('XINFO', 'STREAM', KEYS[1]) "
    "local last, added "
    "for i = 1, #info, 2 do "
    "  if info[i] == 'last-generated-id' then last = info[i + 1] end "
    "  if info[i] == 'entries-added' then added = info[i + 1] end "
    "end "
    "for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do "
    "  local name, delivered "
    "  for i = 1, #g, 2 do "
    "    if g[i] == 'name' then name = g[i + 1] end "
    "    if g[i] == 'last-delivered-id' then delivered = g[i + 1] end "
    "  end "
    "  if name == ARGV[1] then "
    "    if delivered ~= last then return 0 end "
    "    redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], last, 'ENTRIESREAD', added) "
    "    return 1 "
    "  end "
    "end "
    "return 0";
