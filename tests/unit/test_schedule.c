/* test_schedule.c - a schedule's slots, pure: keys, ids, payload, every_next, tz_known, durations. */
#include "core.h"
#include "test.h"

#include <time.h>

static int64_t wall(int y, int mo, int d, int h, int mi, int s) {
    struct tm tm = {.tm_year = y - 1900, .tm_mon = mo - 1, .tm_mday = d, .tm_hour = h, .tm_min = mi, .tm_sec = s};
    return (int64_t)timegm(&tm);
}

TEST(slot_keys) {
    struct cfg_schedule s = {.kind = SCHEDULE_CRON};
    char key[SLOT_KEY_MAX];
    schedule_slot_key(&s, wall(2026, 10, 25, 2, 30, 0), key);
    CHECK_STR(key, "2026-10-25T02:30:00");
    schedule_slot_key(&s, wall(2026, 1, 2, 3, 4, 5), key);
    CHECK_STR(key, "2026-01-02T03:04:05");
    s.kind = SCHEDULE_EVERY;
    schedule_slot_key(&s, 1767225600, key);
    CHECK_STR(key, "@1767225600");
    schedule_slot_key(&s, -60, key);
    CHECK_STR(key, "@-60");
}

TEST(slot_ids_are_uuid5_of_name_and_key) {
    /* The expected values were computed independently, with Debian's Python:
     *   /usr/bin/python3 -c 'import uuid; print(uuid.uuid5(uuid.UUID(SCHEDULE_ID_NAMESPACE), name + "\n" + key))'
     * and pasted here as literals: they must never change (docs/contract.md). */
    char id[ID_LEN + 1];
    schedule_slot_id("nightly-restock", "2026-10-25T02:30:00", id);
    CHECK_STR(id, "60e5146a-5827-5907-9636-38f0ee313d25");
    schedule_slot_id("heartbeat", "@1767225600", id);
    CHECK_STR(id, "3bc64b4a-0e04-562a-b90e-eab68bcbb2d9");
    schedule_slot_id("a.b_c-d", "2026-03-29T02:30:00", id);
    CHECK_STR(id, "d6e054ba-a3a4-56ef-9a45-668188496a01");
    schedule_slot_id("x", "", id);
    CHECK_STR(id, "30aee84f-de1c-5643-bf30-84c7c94681d1");
    CHECK(id_parse(id, NULL));
}

TEST(payload_substitutes_the_slot_in_every_string) {
    struct cfg_schedule s = {
        .payload = "{\"report\": \"restock\", \"at\": \"{{slot}}\", \"note\": \"run of {{slot}} ({{slot}})\","
                   " \"nested\": {\"deep\": [\"{{slot}}\", 1, true, null, {\"x\": \"{{slot}}!\"}]},"
                   " \"n\": 3, \"flag\": false, \"other\": \"{{slo}}t\", \"{{slot}}\": \"key untouched\"}"};
    cJSON *p = schedule_payload(&s, "2026-03-29T03:00:00+02:00");
    CHECK(p != NULL);
    if (!p) return;
    CHECK_STR(cJSON_GetObjectItem(p, "report")->valuestring, "restock");
    CHECK_STR(cJSON_GetObjectItem(p, "at")->valuestring, "2026-03-29T03:00:00+02:00");
    CHECK_STR(cJSON_GetObjectItem(p, "note")->valuestring,
              "run of 2026-03-29T03:00:00+02:00 (2026-03-29T03:00:00+02:00)");
    cJSON *deep = cJSON_GetObjectItem(cJSON_GetObjectItem(p, "nested"), "deep");
    CHECK_STR(cJSON_GetArrayItem(deep, 0)->valuestring, "2026-03-29T03:00:00+02:00");
    CHECK(cJSON_GetArrayItem(deep, 1)->valuedouble == 1);
    CHECK(cJSON_IsTrue(cJSON_GetArrayItem(deep, 2)) && cJSON_IsNull(cJSON_GetArrayItem(deep, 3)));
    CHECK_STR(cJSON_GetObjectItem(cJSON_GetArrayItem(deep, 4), "x")->valuestring, "2026-03-29T03:00:00+02:00!");
    CHECK(cJSON_GetObjectItem(p, "n")->valueint == 3 && cJSON_IsFalse(cJSON_GetObjectItem(p, "flag")));
    CHECK_STR(cJSON_GetObjectItem(p, "other")->valuestring, "{{slo}}t");
    CHECK_STR(cJSON_GetObjectItem(p, "{{slot}}")->valuestring, "key untouched");
    cJSON_Delete(p);
    /* the schedule's own text is untouched: each slot starts from it */
    CHECK(strstr(s.payload, "\"at\": \"{{slot}}\"") != NULL);
    struct cfg_schedule none = {0};
    p = schedule_payload(&none, "x");
    CHECK(cJSON_IsObject(p) && p->child == NULL);
    cJSON_Delete(p);
}

TEST(every_next_counts_multiples_of_the_interval_since_the_epoch) {
    CHECK(schedule_every_next(60, 0) == 60);
    CHECK(schedule_every_next(60, 59) == 60);
    CHECK(schedule_every_next(60, 60) == 120);
    CHECK(schedule_every_next(900, 1767225601) == 1767226500);
    CHECK(schedule_every_next(86400, 1767225600) == 1767225600 + 86400);
    CHECK(schedule_every_next(7, 1) == 7);
    CHECK(schedule_every_next(1, 41) == 42);
    CHECK(schedule_every_next(60, -1) == 0);
    CHECK(schedule_every_next(60, -60) == 0);
    CHECK(schedule_every_next(60, -61) == -60);
}

TEST(tz_known_reads_the_system_tz_data) {
    CHECK(tz_known("Europe/Paris"));
    CHECK(tz_known("UTC"));
    CHECK(tz_known("America/Argentina/Buenos_Aires"));
    CHECK(tz_known("Etc/GMT+5"));
    CHECK(!tz_known("Mars/Olympus"));
    CHECK(!tz_known("../etc/passwd"));
    CHECK(!tz_known("Europe/../../etc/passwd"));
    CHECK(!tz_known("/etc/passwd"));
    CHECK(!tz_known(""));
    CHECK(!tz_known(NULL));
    CHECK(!tz_known("Europe"));           /* a folder, not a TZif file */
    CHECK(!tz_known("zone.tab"));         /* a file, not a TZif one (and '.' is not allowed) */
    CHECK(!tz_known("Europe/Paris "));
    CHECK(!tz_known("Europe/Paris\n"));
    char long_zone[80];
    memset(long_zone, 'A', sizeof long_zone - 1);
    long_zone[sizeof long_zone - 1] = '\0';
    CHECK(!tz_known(long_zone));
}

TEST(durations) {
    int64_t s = -1;
    CHECK(duration_parse("90s", &s) && s == 90);
    CHECK(duration_parse("15m", &s) && s == 900);
    CHECK(duration_parse("1h", &s) && s == 3600);
    CHECK(duration_parse("2d", &s) && s == 172800);
    CHECK(duration_parse("45", &s) && s == 45);
    CHECK(duration_parse("0s", &s) && s == 0);
    s = 7;
    CHECK(!duration_parse("", &s) && s == 7);
    CHECK(!duration_parse("s", &s));
    CHECK(!duration_parse("-5s", &s));
    CHECK(!duration_parse("1.5h", &s));
    CHECK(!duration_parse("1 h", &s));
    CHECK(!duration_parse("1hs", &s));
    CHECK(!duration_parse("1w", &s));
    CHECK(!duration_parse("99999999999999999999s", &s));
    CHECK(!duration_parse(NULL, &s));
    CHECK(s == 7);
}

TEST_MAIN()
