"""Evaluation by mention: the entity groups every probe reports.

The splits are by article (``kilm_ray.data.corpus.articles.split_of``), so an evaluated mention is never a
training sample; what varies is the entity. A mention is **seen** when its entity's knowledge was in the
training data (a training mention links it with knowledge; ``kilm_ray.data.tables``): the question is
whether the model brings that knowledge back in a context it never saw. **unseen** entities test
generalisation to knowledge the model was never given. Which mentions are evaluated: ``select``.
"""

GROUPS = ("seen", "unseen")  # the entity groups every probe reports
