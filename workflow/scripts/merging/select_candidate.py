from pmoe_backdoor.jobs.merging import SelectCandidateJob, select_candidate_job
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    select_candidate_job(SelectCandidateJob.from_context(job))
