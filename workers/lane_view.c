/* lane_view.c - the lanes of a queue as an operator sees them (conveyor-admin
 * stats, the dashboard's /api/lanes): each lane's waiting commands and its
 * oldest command's age, and per class the total and the deepest lane.
 * Counts come from broker_lane_counts (docs/contract.md, section 10). */
#include "workers.h"

#include <stdio.h>

cJSON *lane_queue_json(const struct cfg_queue *q, const struct lane_count *c) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "queue", q->name);
    cJSON_AddNumberToObject(o, "lanes", q->lanes);
    cJSON_AddBoolToObject(o, "ordered", q->ordered);
    cJSON *classes = cJSON_AddArrayToObject(o, "classes"), *lanes = cJSON_AddArrayToObject(o, "lane");
    for (int cls = 0; cls < LANE_CLASSES; cls++) {
        long total = 0;
        int deepest = 0;
        double oldest = -1;
        for (int i = 0; i < q->lanes; i++) {
            const struct lane_count *l = &c[cls * q->lanes + i];
            char name[32];
            lane_label(q->lanes, cls * q->lanes + i, name, sizeof name);
            cJSON *one = cJSON_CreateObject();
            cJSON_AddStringToObject(one, "lane", name);
            cJSON_AddNumberToObject(one, "depth", (double)l->depth);
            json_add_number_or_null(one, "oldestAgeSeconds", l->oldest_age_s);
            cJSON_AddItemToArray(lanes, one);
            total += l->depth;
            if (l->depth > c[cls * q->lanes + deepest].depth) deepest = i;
            if (l->oldest_age_s > oldest) oldest = l->oldest_age_s;
        }
        cJSON *k = cJSON_CreateObject();
        char name[32];
        lane_label(q->lanes, cls * q->lanes + deepest, name, sizeof name);
        cJSON_AddStringToObject(k, "class", lane_class_name(cls));
        cJSON_AddNumberToObject(k, "waiting", (double)total);
        cJSON_AddStringToObject(k, "deepestLane", name);
        cJSON_AddNumberToObject(k, "deepestDepth", (double)c[cls * q->lanes + deepest].depth);
        json_add_number_or_null(k, "oldestAgeSeconds", oldest);
        cJSON_AddItemToArray(classes, k);
    }
    return o;
}
