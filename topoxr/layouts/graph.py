"""Co-activation graph layout: a thresholded distance graph drawn with springs."""

from __future__ import annotations

import numpy as np

from topoxr.layouts._base import BaseLayout, LayoutInputError

__all__ = ["SpringLayout", "threshold_graph"]


def threshold_graph(D: np.ndarray, percentile: float = 7.5):
    """The paper's co-activation graph: edges below a distance percentile, one component.

    Two neurons are joined when their distance is below the ``percentile``-th percentile
    of all pairwise distances (each pair counted once). Every smaller connected component
    is then linked to the largest one by an edge between its closest pair of neurons.

    Pairs at distance zero (identical profiles; dead neurons, which topoxr puts at
    distance 0 from each other) are always joined, and the percentile is taken over the
    other pairs only. Without zero distances this is the paper's rule; with them, the
    paper's threshold is 0 as soon as 7.5 % of the pairs are at 0 (about 27 % dead
    neurons), no pair is below it, and the component joining draws a star around one
    neuron. "Zero" allows for rounding: at most ``1e-12`` times the largest distance.

    Parameters
    ----------
    D : ndarray of shape (n, n)
        Symmetric distances.
    percentile : float, default 7.5
        Threshold percentile, in (0, 100].

    Returns
    -------
    networkx.Graph
        Nodes ``0..n-1``; connected.
    """
    import networkx as nx
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    if not 0 < percentile <= 100:
        raise LayoutInputError(f"percentile must be in (0, 100], got {percentile}")
    n = D.shape[0]
    iu = np.triu_indices(n, k=1)
    pairs = D[iu]
    zero = 1e-12 * float(pairs.max()) if pairs.size else 0.0
    apart = pairs[pairs > zero]
    threshold = np.percentile(apart, percentile) if apart.size else 0.0
    adj = (D < threshold) | (D <= zero)
    np.fill_diagonal(adj, False)
    n_comp, comp = connected_components(csr_matrix(adj), directed=False)
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    rows, cols = np.nonzero(np.triu(adj, k=1))
    graph.add_edges_from(zip(rows.tolist(), cols.tolist(), strict=True))
    if n_comp > 1:
        sizes = np.bincount(comp)
        largest = np.flatnonzero(comp == sizes.argmax())
        for c in np.argsort(-sizes, kind="stable")[1:]:
            members = np.flatnonzero(comp == c)
            sub = D[np.ix_(largest, members)]
            a, b = np.unravel_index(sub.argmin(), sub.shape)
            graph.add_edge(int(largest[a]), int(members[b]))
    return graph


class SpringLayout(BaseLayout):
    """The paper's "graph" layout: co-activation graph + Fruchterman-Reingold springs.

    Neurons closer than the ``percentile``-th percentile of all profile distances are
    connected, and so are neurons with identical profiles (the percentile is then taken
    over the other pairs); smaller components are joined to the largest by their closest
    pair (see :func:`threshold_graph`); networkx's :func:`~networkx.spring_layout` draws
    the graph.

    Parameters
    ----------
    percentile : float, default 7.5
        Edge threshold, as a percentile of all pairwise distances.
    iterations : int, default 50
        Spring-layout iterations (networkx's default, as in the paper's code).
    metric : {"cosine", "correlation", "euclidean", "precomputed"}, default "cosine"
        Metric of the profiles, or ``"precomputed"`` when ``X`` holds distances.
    random_state : int, RandomState instance or None, default None
        Seed of the spring layout's random start.

    Attributes
    ----------
    embedding_ : ndarray of shape (n_neurons, 2)
        Coordinates in ``[0, 1]^2``.
    graph_ : networkx.Graph
        The co-activation graph that was drawn.

    Notes
    -----
    Cost: ``O(n^2)`` memory for the distances and ``O(n^2)`` time per spring iteration
    (networkx uses a dense solver below 500 nodes and a sparse one, slower per node,
    above).
    """

    def __init__(
        self,
        *,
        percentile: float = 7.5,
        iterations: int = 50,
        metric: str = "cosine",
        random_state=None,
    ) -> None:
        self.percentile = percentile
        self.iterations = iterations
        self.metric = metric
        self.random_state = random_state

    def _embed(self, X: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        import networkx as nx

        graph = threshold_graph(self._distances(X), self.percentile)
        self.graph_ = graph
        layout = nx.spring_layout(graph, iterations=int(self.iterations), seed=rng)
        return np.array([layout[i] for i in range(X.shape[0])])
