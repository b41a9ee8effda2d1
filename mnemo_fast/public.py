"""The public names of ``mnemo_fast`` and ``mnemo_fast.reference``, written once.

Both namespaces export the same API (one on the engine chosen per call, one on the reference
engine) and take their ``__all__`` from here. On the ground floor: it imports nothing of the
package, so the lazy ``mnemo_fast.reference`` reads it without loading the method.
"""

NAMES = (
    "MnemonicCodes", "MnemonicMix", "fisher_diagonal", "class_fishers", "perturbation",
    "perturb_", "forget", "ForgetResult", "CodeAccuracy", "code_accuracy", "evaluate",
    "Evaluation", "train_with_codes", "TrainHistory", "adapt_with_codes", "UnlearningError", "ForgetWarning", "backend",
    "explain", "Explanation",
    "diagnose", "Diagnosis", "ClassDiagnosis", "Verdict",
)
