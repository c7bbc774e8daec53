/* SPDX-License-Identifier: Apache-2.0 */
/*
 * A preorder/postorder walk with an explicit parent chain. Each directory's children are read
 * when the walk enters it (or when fts_children asks) and freed when the directory is returned
 * after its contents (FTS_DP), so an entry stays valid until the walk leaves its directory.
 */
#define _GNU_SOURCE
#include "fts.h"

#include <dirent.h>
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

struct entry {
	FTSENT *children;   /* read but not yet freed */
	int children_read;
	struct stat st;
	FTSENT ent;         /* last: fts_name grows past the end */
};

struct walk {
	FTS fts;
	FTSENT *rootparent;
	int started;
};

#define ENTRY(p) ((struct entry *)((char *)(p) - offsetof(struct entry, ent)))
#define WALK(sp) ((struct walk *)(sp))

static FTSENT *new_entry(FTSENT *parent, const char *name, size_t namelen)
{
	struct entry *e;
	size_t plen = 0, len;
	int sep = 0;

	if (namelen > 0xffff) {
		errno = ENAMETOOLONG;
		return NULL;
	}
	e = calloc(1, sizeof(*e) + namelen);
	if (!e)
		return NULL;
	if (parent && parent->fts_level >= FTS_ROOTLEVEL) {
		plen = parent->fts_pathlen;
		sep = plen == 0 || parent->fts_path[plen - 1] != '/';
	}
	len = plen + sep + namelen;
	if (len > 0xffff) {
		free(e);
		errno = ENAMETOOLONG;
		return NULL;
	}
	e->ent.fts_path = malloc(len + 1);
	if (!e->ent.fts_path) {
		free(e);
		return NULL;
	}
	if (plen)
		memcpy(e->ent.fts_path, parent->fts_path, plen);
	if (sep)
		e->ent.fts_path[plen] = '/';
	memcpy(e->ent.fts_path + plen + sep, name, namelen);
	e->ent.fts_path[len] = '\0';
	memcpy(e->ent.fts_name, name, namelen);
	e->ent.fts_name[namelen] = '\0';
	e->ent.fts_pathlen = (unsigned short)len;
	e->ent.fts_namelen = (unsigned short)namelen;
	e->ent.fts_accpath = e->ent.fts_path;
	e->ent.fts_parent = parent;
	e->ent.fts_level = parent ? (short)(parent->fts_level + 1) : FTS_ROOTPARENTLEVEL;
	e->ent.fts_symfd = -1;
	e->ent.fts_instr = FTS_NOINSTR;
	e->ent.fts_statp = &e->st;
	return &e->ent;
}

static void free_list(FTSENT *p);

static void free_entry(FTSENT *p)
{
	struct entry *e = ENTRY(p);

	free_list(e->children);
	free(p->fts_path);
	free(e);
}

static void free_list(FTSENT *p)
{
	while (p) {
		FTSENT *next = p->fts_link;
		free_entry(p);
		p = next;
	}
}

/* Fill in the stat information and fts_info of p. */
static void stat_entry(FTS *sp, FTSENT *p, int follow)
{
	struct stat *st = p->fts_statp;
	FTSENT *a;

	p->fts_errno = 0;
	if (follow) {
		if (stat(p->fts_accpath, st) != 0) {
			int err = errno;
			if (lstat(p->fts_accpath, st) == 0) {
				p->fts_info = FTS_SLNONE;
				goto ids;
			}
			p->fts_errno = err;
			memset(st, 0, sizeof(*st));
			p->fts_info = FTS_NS;
			return;
		}
		p->fts_flags |= FTS_SYMFOLLOW;
	} else if (lstat(p->fts_accpath, st) != 0) {
		p->fts_errno = errno;
		memset(st, 0, sizeof(*st));
		p->fts_info = FTS_NS;
		return;
	}
	if (S_ISDIR(st->st_mode)) {
		p->fts_info = FTS_D;
		for (a = p->fts_parent; a && a->fts_level >= FTS_ROOTLEVEL; a = a->fts_parent) {
			if (a->fts_dev == st->st_dev && a->fts_ino == st->st_ino) {
				p->fts_cycle = a;
				p->fts_info = FTS_DC;
				break;
			}
		}
	} else if (S_ISLNK(st->st_mode)) {
		p->fts_info = FTS_SL;
	} else if (S_ISREG(st->st_mode)) {
		p->fts_info = FTS_F;
	} else {
		p->fts_info = FTS_DEFAULT;
	}
ids:
	p->fts_dev = st->st_dev;
	p->fts_ino = st->st_ino;
	p->fts_nlink = st->st_nlink;
	(void)sp;
}

static int follows(const FTS *sp, const FTSENT *p)
{
	return (sp->fts_options & FTS_LOGICAL) ||
	       ((sp->fts_options & FTS_COMFOLLOW) && p->fts_level == FTS_ROOTLEVEL);
}

static FTSENT *sort_list(FTS *sp, FTSENT *head, int n)
{
	FTSENT **v, *p;
	int i;

	if (!sp->fts_compar || n < 2)
		return head;
	v = malloc(sizeof(*v) * (size_t)n);
	if (!v)
		return head;  /* unsorted rather than failing the walk */
	for (i = 0, p = head; p; p = p->fts_link)
		v[i++] = p;
	qsort(v, (size_t)n, sizeof(*v), (int (*)(const void *, const void *))sp->fts_compar);
	for (i = 0; i < n - 1; i++)
		v[i]->fts_link = v[i + 1];
	v[n - 1]->fts_link = NULL;
	head = v[0];
	free(v);
	return head;
}

/* Read the directory p into a list of stat'ed entries. Returns -1 (with p's fts_errno set)
 * when the directory cannot be read. */
static int read_children(FTS *sp, FTSENT *p)
{
	struct entry *e = ENTRY(p);
	FTSENT *head = NULL, **tail = &head;
	struct dirent *d;
	DIR *dir;
	int n = 0;

	free_list(e->children);
	e->children = NULL;
	e->children_read = 1;
	dir = opendir(p->fts_accpath);
	if (!dir) {
		p->fts_errno = errno;
		return -1;
	}
	while ((errno = 0, d = readdir(dir)) != NULL) {
		FTSENT *c;

		if (!strcmp(d->d_name, ".") || !strcmp(d->d_name, ".."))
			continue;
		c = new_entry(p, d->d_name, strlen(d->d_name));
		if (!c) {
			int err = errno;
			closedir(dir);
			free_list(head);
			p->fts_errno = err;
			return -1;
		}
		/* FTS_NOSTAT: what readdir says is not a directory is not stat'ed (as glibc does). */
		if ((sp->fts_options & FTS_NOSTAT) && d->d_type != DT_DIR && d->d_type != DT_UNKNOWN &&
		    !(d->d_type == DT_LNK && follows(sp, c))) {
			memset(c->fts_statp, 0, sizeof(*c->fts_statp));
			c->fts_info = FTS_NSOK;
		} else {
			stat_entry(sp, c, follows(sp, c));
		}
		if ((sp->fts_options & FTS_XDEV) && c->fts_info == FTS_D && c->fts_dev != sp->fts_dev)
			c->fts_instr = FTS_SKIP;
		*tail = c;
		tail = &c->fts_link;
		n++;
	}
	if (errno) {
		int err = errno;
		closedir(dir);
		free_list(head);
		p->fts_errno = err;
		return -1;
	}
	closedir(dir);
	e->children = sort_list(sp, head, n);
	return 0;
}

FTS *fts_open(char * const *paths, int options, int (*compar)(const FTSENT **, const FTSENT **))
{
	struct walk *w;
	FTSENT *head = NULL, **tail = &head;
	int n = 0;

	if ((options & ~FTS_OPTIONMASK) || (options & (FTS_SEEDOT | FTS_WHITEOUT)) || !paths) {
		errno = EINVAL;
		return NULL;
	}
	/* Neither LOGICAL nor PHYSICAL given: PHYSICAL, as glibc does. */
	if (!(options & (FTS_LOGICAL | FTS_PHYSICAL)))
		options |= FTS_PHYSICAL;
	w = calloc(1, sizeof(*w));
	if (!w)
		return NULL;
	w->fts.fts_options = options | FTS_NOCHDIR;
	w->fts.fts_compar = compar;
	w->fts.fts_rfd = -1;
	w->rootparent = new_entry(NULL, "", 0);
	if (!w->rootparent) {
		free(w);
		return NULL;
	}
	for (; *paths; paths++) {
		size_t len = strlen(*paths);
		FTSENT *p;

		if (len == 0) {
			free_list(head);
			free_entry(w->rootparent);
			free(w);
			errno = ENOENT;
			return NULL;
		}
		p = new_entry(w->rootparent, *paths, len);
		if (!p) {
			free_list(head);
			free_entry(w->rootparent);
			free(w);
			return NULL;
		}
		/* A root's name is its path as given. */
		stat_entry(&w->fts, p, follows(&w->fts, p));
		*tail = p;
		tail = &p->fts_link;
		n++;
	}
	w->fts.fts_nitems = n;
	w->fts.fts_child = sort_list(&w->fts, head, n);
	ENTRY(w->rootparent)->children = w->fts.fts_child;
	ENTRY(w->rootparent)->children_read = 1;
	return &w->fts;
}

/* The entry after p: its next sibling, or its parent returned after its contents. */
static FTSENT *next_after(FTS *sp, FTSENT *p)
{
	FTSENT *parent;

	if (p->fts_link) {
		sp->fts_cur = p->fts_link;
		if (sp->fts_cur->fts_level == FTS_ROOTLEVEL)
			sp->fts_dev = sp->fts_cur->fts_dev;
		return sp->fts_cur;
	}
	parent = p->fts_parent;
	if (parent->fts_level == FTS_ROOTPARENTLEVEL) {
		sp->fts_cur = NULL;
		errno = 0;
		return NULL;
	}
	free_list(ENTRY(parent)->children);
	ENTRY(parent)->children = NULL;
	ENTRY(parent)->children_read = 0;
	parent->fts_info = FTS_DP;
	sp->fts_cur = parent;
	return parent;
}

FTSENT *fts_read(FTS *sp)
{
	struct walk *w = WALK(sp);
	FTSENT *p = sp->fts_cur;
	int instr;

	if (!w->started) {
		w->started = 1;
		sp->fts_cur = sp->fts_child;
		if (sp->fts_cur)
			sp->fts_dev = sp->fts_cur->fts_dev;
		errno = 0;
		return sp->fts_cur;
	}
	if (!p) {
		errno = 0;
		return NULL;
	}
	instr = p->fts_instr;
	p->fts_instr = FTS_NOINSTR;
	if (instr == FTS_AGAIN) {
		stat_entry(sp, p, follows(sp, p));
		return p;
	}
	if (instr == FTS_FOLLOW && (p->fts_info == FTS_SL || p->fts_info == FTS_SLNONE)) {
		stat_entry(sp, p, 1);
		return p;
	}
	if (p->fts_info == FTS_D) {
		struct entry *e = ENTRY(p);

		if (instr == FTS_SKIP) {
			free_list(e->children);
			e->children = NULL;
			e->children_read = 0;
			p->fts_info = FTS_DP;
			return p;
		}
		if (!e->children_read && read_children(sp, p) != 0) {
			p->fts_info = FTS_DNR;
			return p;
		}
		if (e->children) {
			sp->fts_cur = e->children;
			return sp->fts_cur;
		}
		e->children_read = 0;
		p->fts_info = FTS_DP;
		return p;
	}
	return next_after(sp, p);
}

FTSENT *fts_children(FTS *sp, int instr)
{
	struct walk *w = WALK(sp);
	FTSENT *p = sp->fts_cur;

	if (instr != 0 && instr != FTS_NAMEONLY) {
		errno = EINVAL;
		return NULL;
	}
	errno = 0;
	if (!w->started)
		return sp->fts_child;
	if (!p || p->fts_info != FTS_D)
		return NULL;
	if (read_children(sp, p) != 0) {
		errno = p->fts_errno;
		return NULL;
	}
	return ENTRY(p)->children;
}

int fts_set(FTS *sp, FTSENT *p, int instr)
{
	(void)sp;
	if (instr != FTS_AGAIN && instr != FTS_FOLLOW && instr != FTS_NOINSTR && instr != FTS_SKIP) {
		errno = EINVAL;
		return -1;
	}
	p->fts_instr = (unsigned short)instr;
	return 0;
}

int fts_close(FTS *sp)
{
	struct walk *w;

	if (!sp)
		return 0;
	w = WALK(sp);
	free_entry(w->rootparent);  /* frees the roots and every list still read */
	free(w);
	return 0;
}
