/* Prints ids from the local agent (e.g. `unid dev`):
 *
 *   cc -O2 -Icapi/include capi/examples/next_ids.c -Lcapi/target/release -lunid -o next_ids
 *   LD_LIBRARY_PATH=capi/target/release ./next_ids default 5
 */
#include <stdio.h>
#include <stdlib.h>

#include "unid.h"

int main(int argc, char **argv) {
  const char *sequence = argc > 1 ? argv[1] : "default";
  long n = argc > 2 ? atol(argv[2]) : 5;
  unid_t *ids = NULL;
  if (unid_open(sequence, &ids) != UNID_OK) {
    fprintf(stderr, "unid: %s\n", unid_error_message());
    return 1;
  }
  for (long i = 0; i < n; i++) {
    unid_id id;
    char text[40];
    if (unid_next(ids, &id) != UNID_OK) {
      fprintf(stderr, "unid: %s\n", unid_error_message());
      unid_close(ids);
      return 1;
    }
    unid_id_format(id, text, sizeof text);
    printf("%s\n", text);
  }
  unid_close(ids);
  return 0;
}
