/* SPDX-License-Identifier: Apache-2.0 */
/* Walks a small tree made in a temporary directory and checks order, fts_info and the options
 * dracut-install uses: FTS_PHYSICAL, FTS_NOSTAT, FTS_LOGICAL + FTS_COMFOLLOW, FTS_SKIP, a
 * comparison function, FTS_DC on a symlink loop, fts_children. The same file compiled against
 * glibc's <fts.h> (include it instead of "fts.h") passes too: the expectations are glibc's. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fts.h"

static int failures;
#define CHECK(cond) do { if (!(cond)) { fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); failures++; } } while (0)

static char root[256];

static void touch(const char *rel)
{
	char p[512];
	snprintf(p, sizeof(p), "%s/%s", root, rel);
	int fd = open(p, O_CREAT | O_WRONLY, 0644);
	if (fd < 0) { perror(p); exit(2); }
	close(fd);
}

static void mkd(const char *rel)
{
	char p[512];
	snprintf(p, sizeof(p), "%s/%s", root, rel);
	if (mkdir(p, 0755) != 0) { perror(p); exit(2); }
}

static void sym(const char *target, const char *rel)
{
	char p[512];
	snprintf(p, sizeof(p), "%s/%s", root, rel);
	if (symlink(target, p) != 0) { perror(p); exit(2); }
}

static int by_name(const FTSENT **a, const FTSENT **b)
{
	return strcmp((*a)->fts_name, (*b)->fts_name);
}

/* Walk and write "info:relative-path" lines into out. */
static void walk(int options, int skip_b, char *out, size_t outlen)
{
	char *paths[] = { root, NULL };
	FTS *fts = fts_open(paths, options, by_name);
	FTSENT *e;
	size_t rl = strlen(root);

	CHECK(fts != NULL);
	out[0] = '\0';
	while ((e = fts_read(fts)) != NULL) {
		char line[600];
		const char *rel = e->fts_path + rl;
		if (options & FTS_NOCHDIR)
			CHECK(strcmp(e->fts_accpath, e->fts_path) == 0);
		CHECK(e->fts_pathlen == strlen(e->fts_path));
		if (e->fts_level > 0)
			CHECK(strncmp(e->fts_path, e->fts_parent->fts_path, e->fts_parent->fts_pathlen) == 0);
		if (skip_b && e->fts_info == FTS_D && strcmp(e->fts_name, "b") == 0)
			CHECK(fts_set(fts, e, FTS_SKIP) == 0);
		snprintf(line, sizeof(line), "%d:%s ", e->fts_info, *rel ? rel : ".");
		strncat(out, line, outlen - strlen(out) - 1);
	}
	CHECK(errno == 0);
	CHECK(fts_close(fts) == 0);
}

int main(void)
{
	char got[8192], want[8192];

	snprintf(root, sizeof(root), "%s/fts-test-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
	if (!mkdtemp(root)) { perror("mkdtemp"); return 2; }
	mkd("a"); touch("a/f1"); touch("a/f2");
	mkd("b"); mkd("b/c"); touch("b/c/f3");
	sym("a", "la");         /* link to a directory */
	sym("nowhere", "dead"); /* dangling link */
	sym("..", "b/c/up");    /* loop back to b */

	walk(FTS_PHYSICAL | FTS_NOCHDIR, 0, got, sizeof(got));
	snprintf(want, sizeof(want),
		 "%d:. %d:/a %d:/a/f1 %d:/a/f2 %d:/a %d:/b %d:/b/c %d:/b/c/f3 %d:/b/c/up %d:/b/c %d:/b "
		 "%d:/dead %d:/la %d:. ",
		 FTS_D, FTS_D, FTS_F, FTS_F, FTS_DP, FTS_D, FTS_D, FTS_F, FTS_SL, FTS_DP, FTS_DP,
		 FTS_SL, FTS_SL, FTS_DP);
	if (strcmp(got, want) != 0) { fprintf(stderr, "physical:\n got  %s\n want %s\n", got, want); failures++; }

	walk(FTS_PHYSICAL | FTS_NOSTAT, 1, got, sizeof(got));
	snprintf(want, sizeof(want),
		 "%d:. %d:/a %d:/a/f1 %d:/a/f2 %d:/a %d:/b %d:/b %d:/dead %d:/la %d:. ",
		 FTS_D, FTS_D, FTS_NSOK, FTS_NSOK, FTS_DP, FTS_D, FTS_DP, FTS_NSOK, FTS_NSOK, FTS_DP);
	if (strcmp(got, want) != 0) { fprintf(stderr, "skip:\n got  %s\n want %s\n", got, want); failures++; }

	/* Logical: la is walked as a directory, dead is SLNONE, b/c/up repeats b: a cycle. */
	walk(FTS_LOGICAL | FTS_COMFOLLOW | FTS_NOCHDIR, 0, got, sizeof(got));
	snprintf(want, sizeof(want),
		 "%d:. %d:/a %d:/a/f1 %d:/a/f2 %d:/a %d:/b %d:/b/c %d:/b/c/f3 %d:/b/c/up %d:/b/c %d:/b "
		 "%d:/dead %d:/la %d:/la/f1 %d:/la/f2 %d:/la %d:. ",
		 FTS_D, FTS_D, FTS_F, FTS_F, FTS_DP, FTS_D, FTS_D, FTS_F, FTS_DC, FTS_DP, FTS_DP,
		 FTS_SLNONE, FTS_D, FTS_F, FTS_F, FTS_DP, FTS_DP);
	if (strcmp(got, want) != 0) { fprintf(stderr, "logical:\n got  %s\n want %s\n", got, want); failures++; }

	/* fts_children of the root lists its entries, sorted. */
	{
		char *paths[] = { root, NULL };
		FTS *fts = fts_open(paths, FTS_PHYSICAL, by_name);
		FTSENT *r = fts_read(fts), *c;
		char names[256] = "";
		CHECK(r && r->fts_info == FTS_D && r->fts_level == 0);
		for (c = fts_children(fts, 0); c; c = c->fts_link) {
			strcat(names, c->fts_name);
			strcat(names, " ");
			CHECK(c->fts_parent == r && c->fts_level == 1);
		}
		CHECK(strcmp(names, "a b dead la ") == 0);
		/* The walk then descends into the same children. */
		c = fts_read(fts);
		CHECK(c && strcmp(c->fts_name, "a") == 0);
		fts_close(fts);
	}

	/* A missing root is reported as FTS_NS with its errno; bad options are refused. */
	{
		char missing[300];
		snprintf(missing, sizeof(missing), "%s/missing", root);
		char *paths[] = { missing, NULL };
		FTS *fts = fts_open(paths, FTS_PHYSICAL, NULL);
		FTSENT *e = fts_read(fts);
		CHECK(e && e->fts_info == FTS_NS && e->fts_errno == ENOENT);
		CHECK(fts_read(fts) == NULL);
		fts_close(fts);
#ifdef HADRON_FTS_H
		errno = 0;
		CHECK(fts_open(paths, FTS_SEEDOT, NULL) == NULL && errno == EINVAL);
#endif
	}

	{
		char cmd[300];
		snprintf(cmd, sizeof(cmd), "rm -rf '%s'", root);
		if (system(cmd) != 0) failures++;
	}
	if (failures)
		fprintf(stderr, "%d check(s) failed\n", failures);
	return failures ? 1 : 0;
}
