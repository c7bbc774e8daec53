/* SPDX-License-Identifier: Apache-2.0 */
/*
 * fts: walk file hierarchies (the 4.4BSD interface glibc also provides).
 *
 * musl does not implement fts; this is Hadron's implementation of the interface as glibc
 * declares it, for programs such as dracut-install. Supported options: FTS_COMFOLLOW,
 * FTS_LOGICAL, FTS_NOCHDIR, FTS_NOSTAT, FTS_PHYSICAL, FTS_XDEV. The walk never changes the
 * working directory, so fts_accpath always equals fts_path. With FTS_NOSTAT, entries that
 * readdir reports as other than directories are not stat'ed and come back as FTS_NSOK. FTS_SEEDOT and FTS_WHITEOUT are
 * refused with EINVAL.
 */
#ifndef HADRON_FTS_H
#define HADRON_FTS_H

#include <sys/types.h>
#include <sys/stat.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct _ftsent FTSENT;

typedef struct {
	FTSENT *fts_cur;        /* the entry fts_read returned last */
	FTSENT *fts_child;      /* the roots (linked through fts_link) */
	FTSENT **fts_array;     /* unused, kept for layout compatibility */
	dev_t fts_dev;          /* device of the root being walked (FTS_XDEV) */
	char *fts_path;         /* unused */
	int fts_rfd;            /* unused, -1 */
	int fts_pathlen;        /* unused */
	int fts_nitems;         /* number of roots */
	int (*fts_compar)(const FTSENT **, const FTSENT **);
	int fts_options;
} FTS;

struct _ftsent {
	struct _ftsent *fts_cycle;  /* FTS_DC: the ancestor this directory repeats */
	struct _ftsent *fts_parent;
	struct _ftsent *fts_link;   /* next sibling */
	long fts_number;            /* for the caller */
	void *fts_pointer;          /* for the caller */
	char *fts_accpath;          /* path to access the file (same as fts_path) */
	char *fts_path;             /* root path + path from the root */
	int fts_errno;
	int fts_symfd;              /* unused, -1 */
	unsigned short fts_pathlen;
	unsigned short fts_namelen;
	ino_t fts_ino;
	dev_t fts_dev;
	nlink_t fts_nlink;
	short fts_level;            /* 0 for roots, -1 for their common parent */
	unsigned short fts_info;
	unsigned short fts_flags;
	unsigned short fts_instr;
	struct stat *fts_statp;
	char fts_name[1];           /* file name, allocated to size */
};

/* fts_open options */
#define FTS_COMFOLLOW  0x0001  /* follow symbolic links given as roots */
#define FTS_LOGICAL    0x0002  /* follow every symbolic link */
#define FTS_NOCHDIR    0x0004  /* do not change directories (always true here) */
#define FTS_NOSTAT     0x0008  /* do not stat what is not a directory (FTS_NSOK) */
#define FTS_PHYSICAL   0x0010  /* do not follow symbolic links */
#define FTS_SEEDOT     0x0020  /* return "." and ".." (not supported) */
#define FTS_XDEV       0x0040  /* do not cross devices */
#define FTS_WHITEOUT   0x0080  /* return whiteouts (not supported) */
#define FTS_OPTIONMASK 0x00ff
#define FTS_NAMEONLY   0x0100  /* fts_children: names only (everything is filled here) */

#define FTS_ROOTPARENTLEVEL -1
#define FTS_ROOTLEVEL 0

/* fts_info */
#define FTS_D        1   /* directory, before its contents */
#define FTS_DC       2   /* directory that causes a cycle */
#define FTS_DEFAULT  3   /* none of the others */
#define FTS_DNR      4   /* directory that cannot be read */
#define FTS_DOT      5   /* "." or ".." */
#define FTS_DP       6   /* directory, after its contents */
#define FTS_ERR      7   /* error; fts_errno says which */
#define FTS_F        8   /* regular file */
#define FTS_INIT     9
#define FTS_NS      10   /* stat failed */
#define FTS_NSOK    11
#define FTS_SL      12   /* symbolic link */
#define FTS_SLNONE  13   /* symbolic link to nothing */
#define FTS_W       14

/* fts_flags */
#define FTS_DONTCHDIR 0x01
#define FTS_SYMFOLLOW 0x02

/* fts_set instructions */
#define FTS_AGAIN    1   /* visit this entry again */
#define FTS_FOLLOW   2   /* follow this symbolic link */
#define FTS_NOINSTR  3
#define FTS_SKIP     4   /* do not descend into this directory */

FTS *fts_open(char * const *paths, int options, int (*compar)(const FTSENT **, const FTSENT **));
FTSENT *fts_read(FTS *sp);
FTSENT *fts_children(FTS *sp, int instr);
int fts_set(FTS *sp, FTSENT *p, int instr);
int fts_close(FTS *sp);

#ifdef __cplusplus
}
#endif

#endif
