// SPDX-License-Identifier: GPL-2.0-only
/*
 * Debian trixie's libelf.a (elfutils 0.192) references the search-tree helpers of elfutils' internal
 * libeu.a, which is not shipped, so a static link of libbpf + libelf fails with
 * "undefined reference to eu_search_tree_init". The shared libelf.so.1 of the same build imports no
 * rwlock functions: it is built without locks, so a tree is just a tsearch(3) root pointer. These
 * five functions are that, on top of glibc's tsearch.
 */
#define _GNU_SOURCE
#include <search.h>
#include <stddef.h>

typedef struct {
	void *root;
} search_tree;

void eu_search_tree_init(search_tree *tree) { tree->root = NULL; }

static void keep_node(void *node) { (void)node; }

void eu_search_tree_fini(search_tree *tree, void (*free_node)(void *))
{
	tdestroy(tree->root, free_node ? free_node : keep_node);
	tree->root = NULL;
}

void *eu_tsearch(const void *key, search_tree *tree, int (*compar)(const void *, const void *))
{
	return tsearch(key, &tree->root, compar);
}

void *eu_tfind(const void *key, search_tree *tree, int (*compar)(const void *, const void *))
{
	return tfind(key, &tree->root, compar);
}

void *eu_tdelete(const void *key, search_tree *tree, int (*compar)(const void *, const void *))
{
	return tdelete(key, &tree->root, compar);
}
